"""What every backend must show, as a pytest class: subclass it with your backend and run pytest.

    from .conformance import BackendConformance
    from my_plugin import MyBackend

    class TestMyBackend(BackendConformance):
        backend_class = MyBackend
        entry_point = "mine"        # the name under ulog_disk.backends; None skips the daemon test

The engine decides every rule (hand-over, retention, generations); these tests drive it with the
kernel's requests (:class:`~ulog_disk.testing.kernel.Kernel`) on top of the backend and check
what the kernel reads afterwards, across a restart of the engine on a new instance of the
backend — which is all a backend is for. One test runs the real daemon and kills it with -9.

What is expected depends on two claims of the backend (``docs/backends.md``):

* ``restores`` (default: the class's ``durable``): whatever was answered comes back after a
  restart, exactly. A backend that does not restore (``memory``) must come back *empty*, never
  with another state: the kernel then reconnects and the whole mirror resyncs, which is safe.
* ``durable``: an answered FLUSH survives a host crash, so the next boot's instance of the uuid
  takes it over at its RESUME. Losing the page cache cannot be simulated in a test; what is
  checked is that the state is handed to another boot from what ``restore`` returns.

Needs pytest (the ``testing`` extra); nothing else in the package imports this module.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from ..daemon.applier import Applier
from ..protocol import wire
from ..protocol.wire import RequestType as T
from ..storage.base import OP_MARK, Backend, InstanceRecord
from . import launcher
from .client import Client
from .kernel import Kernel

UUID = "LVM-conformance"
REGIONS = 64
#: Every region in sync at the start ('nosync'), so what the tests change stands out.
NOSYNC = f"{REGIONS * 8} clustered-core 8 nosync"
#: The default sync mode: a log with nothing to take over starts all out of sync.
DEFAULT = f"{REGIONS * 8} clustered-core 8"
DIRTY = 3
UNSYNCED = 9


def settle(engine: Applier) -> None:
    """Run the store writes the daemon runs in the background until none is left."""
    while engine.unstored:
        pending = engine.checkpoint(next(iter(engine.unstored)))
        if pending is not None:
            engine.complete_now(pending)


def write_state(k: Kernel, luid: int) -> None:
    """Region DIRTY marked and flushed, UNSYNCED out of sync and flushed, another region marked
    and cleared: what the kernel sees afterwards is dirty {DIRTY}, out of sync {UNSYNCED}."""
    k.mark([DIRTY, 20], luid)
    k.flush(luid=luid)
    k.clear([20], luid)
    k.set_sync(UNSYNCED, 0, luid)
    k.flush(luid=luid)


def assert_regions(k: Kernel, luid: int, dirty: list[int], unsynced: list[int]) -> None:
    clean, in_sync = k.bits(REGIONS, luid)
    assert [r for r in range(REGIONS) if not clean[r]] == dirty
    assert [r for r in range(REGIONS) if not in_sync[r]] == unsynced
    assert k.sync_count(luid) == REGIONS - len(unsynced)


def assert_state(k: Kernel, luid: int) -> None:
    """What :func:`write_state` left, as the same instance reads it."""
    assert_regions(k, luid, [DIRTY], [UNSYNCED])


def assert_handed_over(k: Kernel, luid: int) -> None:
    """What :func:`write_state` left, as another instance took it over: a region marked and not
    cleared is out of sync too (the new instance knows nothing of the writes in flight)."""
    assert_regions(k, luid, [DIRTY], sorted([DIRTY, UNSYNCED]))


def assert_unknown(k: Kernel, luid: int) -> None:
    assert k.err(T.IS_CLEAN, wire.build_u64(0), luid) == -errno.ESRCH


class BackendConformance:
    #: The backend under test.
    backend_class: ClassVar[type[Backend]]
    #: Its name in the ``ulog_disk.backends`` entry point group, for the daemon test (None: skipped).
    entry_point: ClassVar[str | None] = None
    #: Variables for the daemon's environment (a plugin found through PYTHONPATH, say).
    daemon_env: ClassVar[dict[str, str] | None] = None
    #: Whether instances come back after a restart; None: what ``durable`` says.
    restores: ClassVar[bool | None] = None

    @property
    def restoring(self) -> bool:
        return self.backend_class.durable if self.restores is None else self.restores

    @pytest.fixture
    def state_dir(self, tmp_path: Path) -> Path:
        return tmp_path / "state"

    @pytest.fixture
    def start(self, state_dir: Path) -> Iterator[Callable[..., Kernel]]:
        """start(boot_id) → a Kernel on a new engine over a new backend of the state directory,
        restored as the daemon restores it at start-up; closed at the end unless stopped."""
        live: list[Applier] = []

        def start(boot_id: str = "boot-1") -> Kernel:
            engine = Applier.over(self.backend_class(state_dir), boot_id=boot_id)
            engine.restore()
            live.append(engine)
            return Kernel(engine, uuid=UUID, ctr=NOSYNC)

        self._live = live
        yield start
        for engine in live:
            engine.backend.close()

    def stop(self, k: Kernel, how: str) -> None:
        """End an engine's life: ``kill`` closes the backend with nothing more written (what a
        kill -9 leaves, as far as the backend is concerned), ``stop`` first writes every
        instance, as the daemon does at SIGTERM."""
        engine = k.engine
        self._live.remove(engine)
        if how == "stop":
            for pending in engine.commit_all():
                engine.complete_now(pending)
        engine.backend.close()

    # --- restore ----------------------------------------------------------------------------------

    def test_the_daemon_killed_restores_what_was_answered(self, tmp_path: Path) -> None:
        """kill -9 of a real daemon, restarted on the same boot (the kernel is alive): a restoring
        backend answers as before; one that does not answers -ESRCH, and after the kernel's
        reconnect nothing reads as clean or in sync."""
        if self.entry_point is None:
            pytest.skip("no entry point: the daemon cannot load this backend")
        d = launcher.launch(tmp_path, backend=self.entry_point, boot_id="boot-1", env=self.daemon_env)
        try:
            c = Client(d.socket_path)
            c.ok(UUID, 1, T.CTR, NOSYNC.encode())
            c.ok(UUID, 1, T.RESUME)
            c.ok(UUID, 1, T.FLUSH, wire.build_regions([DIRTY]))
            c.ok(UUID, 1, T.SET_REGION_SYNC, wire.build_set_region_sync(UNSYNCED, 0))
            c.ok(UUID, 1, T.FLUSH)
            c.close()
        finally:
            d.kill9()
        d = launcher.launch(tmp_path, backend=self.entry_point, boot_id="boot-1", env=self.daemon_env,
                            name="again")
        try:
            c = Client(d.socket_path)
            error, _ = c.request(UUID, 1, T.IS_CLEAN, wire.build_u64(0))
            if self.restoring:
                assert error == 0, d.log_text()
                clean, in_sync = c.bits(UUID, 1, REGIONS)
                assert [r for r in range(REGIONS) if not clean[r]] == [DIRTY]
                assert [r for r in range(REGIONS) if not in_sync[r]] == [UNSYNCED]
            else:
                assert error == -errno.ESRCH
                c.ok(UUID, 1, T.CTR, NOSYNC.encode() + b"\0")
                c.ok(UUID, 1, T.RESUME)
                assert c.bits(UUID, 1, REGIONS) == ([0] * REGIONS, [0] * REGIONS)
            c.close()
        finally:
            d.kill9()

    @pytest.mark.parametrize("how", ["kill", "stop"])
    def test_restart_restores_the_instance(self, start: Callable[..., Kernel], how: str) -> None:
        k = start()
        k.up(luid=1)
        write_state(k, 1)
        self.stop(k, how)
        k = start()
        if self.restoring:
            assert_state(k, 1)
        else:
            assert_unknown(k, 1)

    # --- hand-over and retention ---------------------------------------------------------------

    @pytest.mark.parametrize("source", ["suspended", "retained"])
    def test_hand_over_at_resume(self, start: Callable[..., Kernel], source: str) -> None:
        """A new instance of the uuid takes the old one's state at its RESUME: from the suspended
        instance itself, or from the uuid's retained state once the old one is gone; and the
        state handed over is what comes back after a restart."""
        k = start()
        k.up(luid=1)
        write_state(k, 1)
        k.ctr(DEFAULT, 2)
        k.suspend(1)
        if source == "retained":
            k.dtr(1)
        k.resume(2)
        assert_handed_over(k, 2)
        if source == "suspended":
            k.dtr(1)
        settle(k.engine)
        self.stop(k, "kill")
        k = start()
        assert_unknown(k, 1)
        if self.restoring:
            assert_handed_over(k, 2)
        else:
            assert_unknown(k, 2)

    @pytest.mark.parametrize("restart", [False, True], ids=["same-run", "restarted"])
    def test_retention_at_the_last_dtr(self, start: Callable[..., Kernel], restart: bool) -> None:
        """The uuid's last instance removed (dmsetup remove) keeps its state for the uuid's next
        instance (dmsetup create): within one run whatever the backend, across a restart where
        the backend restores. A fresh instance (default sync mode) otherwise resyncs everything."""
        k = start()
        k.up(luid=1)
        write_state(k, 1)
        k.suspend(1)
        k.dtr(1)
        if restart:
            self.stop(k, "kill")
            k = start()
        k.up(DEFAULT, luid=2)
        if self.restoring or not restart:
            assert_handed_over(k, 2)
        else:
            assert k.sync_count(2) == 0

    # --- durability ----------------------------------------------------------------------------------

    def test_another_boot_takes_over_what_was_flushed(self, start: Callable[..., Kernel]) -> None:
        """After a reboot the kernel builds new instances (any luid, here luid 1 again): a durable
        backend's state is handed to the new instance at its RESUME; a volatile one leaves a
        full resync."""
        k = start("boot-1")
        k.up(luid=1)
        write_state(k, 1)
        self.stop(k, "kill")
        k = start("boot-2")
        k.up(DEFAULT, luid=1)
        if self.backend_class.durable:
            assert_handed_over(k, 1)
        else:
            assert k.sync_count(1) == 0

    def test_journal_tickets_are_ordered_and_sync_reaches_them(self, start: Callable[..., Kernel]) -> None:
        """The journal calls' contract (a journaled backend only): tickets never go back, sync()
        covers every ticket handed out before it, and the durable position never passes the
        position."""
        if not self.backend_class.journaled:
            pytest.skip("not journaled: every FLUSH is a commit")
        k = start()
        k.up(luid=1)
        backend = k.engine.backend
        last = backend.position()
        for regions in ([1], [2, 3], None):
            if regions is None:
                k.flush(luid=1)
            else:
                k.mark(regions, 1)
            position = backend.position()
            assert position >= last
            last = position
        assert backend.durable_position() <= backend.position()
        assert backend.sync() >= last
        assert backend.durable_position() >= last
        # Each journal call returns its ticket: the position after its record (a FLUSH waits
        # for exactly that).
        rec = InstanceRecord(uuid=UUID, luid=1, ctr=NOSYNC, log_type="clustered-core", region_size=8,
                             region_count=REGIONS, state="live", generation=1, cursor=0, boot_id="boot-1",
                             resumed=True)
        for call in (lambda: backend.log_ops(UUID, 1, [(OP_MARK, 4)]), lambda: backend.log_flush(rec, []),
                     lambda: backend.log_event(rec, 2)):
            ticket = call()
            assert type(ticket) is int and ticket == backend.position() > last, ticket
            last = ticket
