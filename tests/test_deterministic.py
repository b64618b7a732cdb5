"""The engine is a deterministic state machine: what a replica of the log relies on.

Two fresh engines fed the same request stream with the same times give byte-identical replies,
identical effects and equal state — for a stream recorded from a real kernel (a capture of a
real-kernel run, ``tests/data/reload-same-uuid.cap``) and for streams hypothesis makes. The
engine's module performs no I/O of its own (checked on its imports), and the request table's
``writes`` and ``answered`` columns say what the handlers actually emit.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ulog_disk.log import engine
from ulog_disk.log.engine import Engine, Step
from ulog_disk.log.lifecycle import State
from ulog_disk.protocol import capture, requests, wire
from ulog_disk.protocol.requests import Answered
from ulog_disk.protocol.wire import Request, RequestType

T = RequestType
DATA = Path(__file__).parent / "data"
RECORDED = DATA / "reload-same-uuid.cap"
BOOT = "boot-determinism"


def run(stream: Iterable[tuple[Request, float]]) -> tuple[list[Any], Any]:
    """Feed a fresh engine the stream; every waited-for step completes at once, successfully
    (as a replica's applier reports it). Returns (every output, in order; the final state)."""
    eng = Engine(BOOT)
    out: list[Any] = []
    now = 0.0
    for req, now in stream:
        result = eng.step(req, now)
        check_uuid_index(eng)
        if isinstance(result, wire.Reply):
            out.append(("reply", wire.encode_reply(result)))
            continue
        reply = None if result.reply is None else wire.encode_reply(result.reply)
        out.append(("step", reply, result.wait, result.effects))
        if result.wait is not Answered.AT_ONCE:
            done = eng.completed(result.work, None)
            out.append(("completed", None if done is None else wire.encode_reply(done)))
    for step in eng.commit_all(now):
        out.append(("stop", step.effects))
    return out, state_of(eng)


def check_uuid_index(eng: Engine) -> None:
    """The engine's instances per uuid (what the hand-over rule and DTR read) are its table
    grouped by uuid, in the table's order (on a tie the rule takes the first found)."""
    grouped: dict[str, list[tuple[int, Any]]] = {}
    for (uuid, luid), inst in eng.table.items():
        grouped.setdefault(uuid, []).append((luid, inst))
    assert {uuid: list(same.items()) for uuid, same in eng.by_uuid.items()} == grouped


def state_of(eng: Engine) -> Any:
    table = {
        key: (inst.record(), inst.log.clean.tobytes(), inst.log.sync.tobytes(), inst.log.recovering,
              inst.health, inst.heard, inst.reconnecting, inst.journal_gap)
        for key, inst in sorted(eng.table.items())
    }
    return (table, eng.generations, eng.gone, eng.earlier_boot, eng.retained_generation, eng.stats)


def recorded() -> tuple[list[tuple[Request, float]], dict[int, bytes]]:
    """The requests of the recording, with their times, and the replies the daemon sent in that
    real-kernel run, by seq."""
    stream, replies = [], {}
    for rec in capture.read_capture(RECORDED.read_bytes()):
        if rec.direction == capture.TO_DAEMON:
            stream.append((wire.decode_frame(rec.frame), rec.time_ns / 1e9))
        else:
            replies[wire.decode_reply(rec.frame).seq] = bytes(rec.frame)
    return stream, replies


def replies_by_seq(outputs: list[Any], stream: list[tuple[Request, float]]) -> dict[int, bytes]:
    """The replies a run sent (at once, or once its wait completed), by seq."""
    sent = {}
    for out in outputs:
        if out[0] in ("reply", "step", "completed") and out[1] is not None:
            sent[wire.decode_reply(out[1]).seq] = out[1]
    return sent


def test_a_recorded_kernel_stream_gives_the_same_outputs_and_state_twice() -> None:
    stream, recorded_replies = recorded()
    kinds = {req.kind for req, _ in stream}
    # The recording exercises the whole life of a mirror and a reload with the same uuid.
    assert {T.CTR, T.RESUME, T.FLUSH, T.IN_SYNC, T.GET_RESYNC_WORK, T.SET_REGION_SYNC, T.PRESUSPEND,
            T.POSTSUSPEND, T.DTR, T.GET_SYNC_COUNT} <= kinds, kinds
    assert len({req.luid for req, _ in stream if req.kind is T.CTR}) >= 2
    first, second = run(stream), run(stream)
    assert first[0] == second[0]
    assert first[1] == second[1]
    # Replayed, the engine answers every request byte for byte as the daemon answered the real
    # kernel in that run.
    assert replies_by_seq(first[0], stream) == recorded_replies


# --- generated streams ------------------------------------------------------------------------------

UUIDS = ["LVM-a", "LVM-b"]
LUIDS = [1, 2, 3]
REGIONS = 64
CTR = f"{REGIONS * 1024} clustered-core 1024"


@st.composite
def request_streams(draw: st.DrawFn) -> list[tuple[Request, float]]:
    n = draw(st.integers(1, 60))
    stream: list[tuple[Request, float]] = []
    now = 1_700_000_000.0
    for seq in range(1, n + 1):
        kind = draw(st.sampled_from(list(RequestType)))
        region = draw(st.integers(0, REGIONS + 2))
        if kind is T.CTR:
            data = draw(st.sampled_from([CTR.encode(), CTR.encode() + b"\0",
                                         f"{REGIONS * 2048} core 1024 nosync".encode()]))
        elif kind in (T.MARK_REGION, T.CLEAR_REGION, T.FLUSH):
            regions = draw(st.lists(st.integers(0, REGIONS - 1), max_size=4,
                                    min_size=0 if kind is T.FLUSH else 1))
            data = wire.build_regions(regions)
        elif kind in (T.IS_CLEAN, T.IN_SYNC, T.IS_REMOTE_RECOVERING):
            data = wire.build_u64(region)
        elif kind is T.SET_REGION_SYNC:
            data = wire.build_set_region_sync(min(region, REGIONS - 1), draw(st.integers(0, 1)))
        else:
            data = b""
        now += draw(st.floats(0, 5))
        req = Request(luid=draw(st.sampled_from(LUIDS)), uuid=draw(st.sampled_from(UUIDS)),
                      version=wire.DM_ULOG_REQUEST_VERSION, seq=seq, request_type=int(kind), data=data)
        stream.append((req, now))
    return stream


@settings(max_examples=150, deadline=None)
@given(request_streams())
def test_generated_streams_give_the_same_outputs_and_state_twice(stream: list[tuple[Request, float]]) -> None:
    first, second = run(stream), run(stream)
    assert first[0] == second[0]
    assert first[1] == second[1]


# --- the engine does no I/O -----------------------------------------------------------------------

FORBIDDEN = {"os", "time", "threading", "socket", "select", "selectors", "lmdb", "subprocess", "io"}
NOT_BELOW_THE_ENGINE = {"journal", "daemon", "service", "applier", "metrics", "transport", "statedir",
                        "limits", "bootid", "backends.lmdb_store", "backends.memory"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_engine_module_imports_no_io() -> None:
    found = imports_of(Path(engine.__file__))
    assert not {name.split(".")[0] for name in found if not name.startswith(".")} & FORBIDDEN, found
    local = {name.lstrip(".") for name in found if name.startswith(".")}
    below = {m for m in local if m in NOT_BELOW_THE_ENGINE or m.split(".")[0] in NOT_BELOW_THE_ENGINE}
    assert not below, below
    source = Path(engine.__file__).read_text()
    assert "open(" not in source


# --- the request table says what the handlers do ----------------------------------------------------


def _payload(kind: RequestType) -> bytes:
    if kind in (T.MARK_REGION, T.CLEAR_REGION, T.FLUSH):
        return wire.build_regions([3, 4])
    if kind in (T.IS_CLEAN, T.IN_SYNC, T.IS_REMOTE_RECOVERING):
        return wire.build_u64(3)
    if kind is T.SET_REGION_SYNC:
        return wire.build_set_region_sync(3, 1)
    if kind is T.CTR:
        return CTR.encode()
    return b""


SETUPS: dict[State, list[RequestType]] = {
    State.CONSTRUCTED: [T.CTR],
    State.LIVE: [T.CTR, T.RESUME],
    State.PRESUSPENDED: [T.CTR, T.RESUME, T.PRESUSPEND],
    State.SUSPENDED: [T.CTR, T.RESUME, T.PRESUSPEND, T.POSTSUSPEND],
}


def test_each_rows_writes_and_answered_columns_match_what_its_handler_emits() -> None:
    """Every type in every state an instance can be in: a type whose row says it writes nothing
    returns a plain reply; one that writes returns a step with effects in at least one state, and
    every step waits as the row's ``answered`` says."""
    seq = itertools.count(1)
    emitted: dict[RequestType, bool] = {kind: False for kind in RequestType}
    for state, setup in SETUPS.items():
        for kind in RequestType:
            eng = Engine(BOOT)
            for prep in setup:
                result = eng.step(Request(1, "LVM-t", 3, next(seq), int(prep), _payload(prep)), 1.0)
                if isinstance(result, Step) and result.wait is not Answered.AT_ONCE:
                    eng.completed(result.work, None)
            assert eng.table[("LVM-t", 1)].state is state
            # CTR of a new key (an existing one's repeat changes nothing and writes nothing).
            luid = 2 if kind is T.CTR else 1
            result = eng.step(Request(luid, "LVM-t", 3, next(seq), int(kind), _payload(kind)), 2.0)
            facts = requests.REQUESTS[kind]
            if isinstance(result, wire.Reply):
                assert result.error == 0, (kind, state, result)
                continue
            assert facts.writes, f"{kind.name} emitted {result.effects} but its row says it writes nothing"
            assert result.wait is facts.answered, (kind, state, result.wait)
            emitted[kind] = emitted[kind] or bool(result.effects)
    assert {k for k, e in emitted.items() if e} == {k for k, f in requests.REQUESTS.items() if f.writes}


def test_every_row_names_a_handler_of_the_engine() -> None:
    for kind, facts in requests.REQUESTS.items():
        assert callable(getattr(Engine, f"_{facts.handler}")), kind
    assert set(Engine._HANDLERS) == set(RequestType) - {T.CTR}
