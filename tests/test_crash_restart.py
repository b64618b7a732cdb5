"""kill -9 of dm-ulogd (LMDB backend) at random moments, restart, and the two rules a restart keeps.

A driver plays the kernel with one request in flight at a time and keeps an oracle: the region
log as every *acknowledged* request left it, plus a snapshot at every acknowledged commit (FLUSH,
RESUME, POSTSUSPEND). A killer thread SIGKILLs the daemon at a random instant. Then:

* **the daemon died, the kernel did not** (same boot id, same luid): the restarted daemon answers
  for the log at once, without CTR, and its clean/sync bits equal the oracle's — or the oracle's
  with the one unacknowledged request applied. Nothing else may change.
* **the kernel's state is gone** (every few crash points: a new boot id and a new luid): the new
  instance adopts the stored state. The store holds the last acknowledged commit, or a later
  state: a background checkpoint may have stored requests answered after it, and the journal
  keeps what was synced. So every region out of sync or dirty in *every* state since the last
  acknowledged commit (nothing acknowledged since made it good) must be out of sync — no region
  whose writes may have been in flight is trusted — and no region may be out of sync that was
  good in every one of them (nothing resynced without a cause).

``ULOG_CRASH_POINTS`` sets the number of crash points (default 24; the full run uses 200+).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

from ulog_disk.log.regionlog import RegionLog
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.testing.client import Client, DaemonGone
from ulog_disk.testing.kernel import acknowledged, bits_of, log_of
from ulog_disk.testing.launcher import Daemon, launch

UUID = "LVM-crashtest"
REGIONS = 48
CTR = f"{REGIONS * 8} clustered-core 8"


COMMITS = (RequestType.FLUSH, RequestType.RESUME, RequestType.POSTSUSPEND)


def random_request(rng: random.Random) -> tuple[RequestType, bytes]:
    pick = rng.random()
    regions = rng.sample(range(REGIONS), rng.randint(1, 6))
    if pick < 0.3:
        return RequestType.MARK_REGION, wire.build_regions(regions)
    if pick < 0.5:
        return RequestType.CLEAR_REGION, wire.build_regions(regions)
    if pick < 0.7:
        return RequestType.SET_REGION_SYNC, wire.build_set_region_sync(regions[0], rng.random() < 0.85)
    if pick < 0.85:
        return RequestType.FLUSH, wire.build_regions(regions) if rng.random() < 0.5 else b""
    return RequestType.FLUSH, b""


def test_kill9_at_random_points(tmp_path: Path) -> None:
    points = int(os.environ.get("ULOG_CRASH_POINTS", "24"))
    rng = random.Random(int(os.environ.get("ULOG_CRASH_SEED", "1")))
    state = tmp_path / "state"
    boot = 1
    luid = 0x1000
    daemon = _start(tmp_path, state, boot, 0)
    client = Client(daemon.socket_path)
    client.ok(UUID, luid, RequestType.CTR, CTR.encode())
    client.ok(UUID, luid, RequestType.RESUME)
    oracle = RegionLog.fresh(REGIONS, False)
    # The states since the last acknowledged commit, oldest first: the store (a checkpoint, the
    # journal's synced part) holds one of them, or one of them with later clears lost.
    history = [oracle.copy()]
    survived_checks = gone_checks = 0
    for point in range(1, points + 1):
        killer = threading.Timer(rng.uniform(0.0, 0.25), lambda d=daemon: d.proc.send_signal(signal.SIGKILL))
        killer.start()
        in_flight: tuple[RequestType, bytes] | None = None
        try:
            while True:
                in_flight = random_request(rng)
                error, _ = client.request(UUID, luid, *in_flight)
                assert error == 0, (in_flight[0].name, error)
                acknowledged(oracle, *in_flight)
                if in_flight[0] in COMMITS:
                    history = [oracle.copy()]
                else:
                    history.append(oracle.copy())
                in_flight = None
        except DaemonGone:
            pass
        killer.join()
        daemon.proc.wait()
        client.close()

        # What the unacknowledged request could have done, if it got as far as the store.
        maybe = oracle.copy()
        if in_flight is not None:
            acknowledged(maybe, *in_flight)
        states = [*history, maybe]

        if point % 6:
            # The daemon died, the kernel did not: same boot, same luid, no CTR.
            daemon = _start(tmp_path, state, boot, point)
            client = Client(daemon.socket_path)
            seen = client.bits(UUID, luid, REGIONS)
            assert seen in (bits_of(oracle), bits_of(maybe)), f"crash point {point}: state changed"
            if seen != bits_of(oracle):
                oracle = maybe
                history.append(oracle.copy())
            survived_checks += 1
        else:
            # The host rebooted: new boot id; the kernel constructs the log with a new luid.
            boot += 1
            daemon = _start(tmp_path, state, boot, point)
            client = Client(daemon.socket_path)
            luid += 1
            client.ok(UUID, luid, RequestType.CTR, CTR.encode())
            client.ok(UUID, luid, RequestType.RESUME)
            clean, sync = client.bits(UUID, luid, REGIONS)
            bad = {r for r in range(REGIONS) if not sync[r]}
            bad_in = [{r for r in range(REGIONS) if not s.sync[r] or not s.clean[r]} for s in states]
            must = set.intersection(*bad_in)
            may = set.union(*bad_in)
            assert must <= bad, (f"crash point {point} (in flight {in_flight and in_flight[0].name}): "
                                 f"regions {sorted(must - bad)} out of sync or dirty in every state since "
                                 f"the last acknowledged commit are reported in sync")
            assert bad <= may, (f"crash point {point}: regions {sorted(bad - may)} are resynced although "
                                f"good in every state since the last acknowledged commit")
            oracle = log_of(clean, sync)
            history = [oracle.copy()]
            gone_checks += 1
            assert "adopts the state of luid" in daemon.log_text()
    assert daemon.stop() == 0
    assert survived_checks >= points // 2 and gone_checks >= points // 8


def _start(tmp: Path, state: Path, boot: int, point: int) -> Daemon:
    return launch(tmp, capture=True, backend="lmdb", state_dir=state, name=f"d{point}",
                  boot_id=f"boot-{boot}")
