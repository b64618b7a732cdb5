"""The lifecycle tables and the per-uuid rules (ulog_disk.log.lifecycle), by themselves and as the
engine applies them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.daemon.applier import Applier
from ulog_disk.log import lifecycle as lc
from ulog_disk.log.lifecycle import EXISTING, LifecycleError, State
from ulog_disk.log.records import InstanceRecord
from ulog_disk.protocol.wire import RequestType
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.kernel import Kernel

T = RequestType


def expected(state: State, request: RequestType) -> State:
    """The per-instance rules of the module docstring, written out again independently."""
    if request is T.RESUME:
        return State.LIVE
    if request is T.DTR:
        return State.DESTROYED
    if request is T.PRESUSPEND and state is State.LIVE:
        return State.PRESUSPENDED
    if request is T.POSTSUSPEND and state in (State.LIVE, State.PRESUSPENDED):
        return State.SUSPENDED
    return state


@pytest.mark.parametrize(("state", "request_type"), list(itertools.product(EXISTING, RequestType)))
def test_every_request_is_listed_between_ctr_and_dtr(state: State, request_type: RequestType) -> None:
    assert lc.next_state(state, request_type) is expected(state, request_type)


@pytest.mark.parametrize("request_type", list(RequestType))
def test_nothing_is_accepted_after_dtr(request_type: RequestType) -> None:
    with pytest.raises(LifecycleError, match="not accepted in state destroyed"):
        lc.next_state(State.DESTROYED, request_type)
    # A missing transition is a bug of ours, never taken for a request the kernel got wrong
    # (the engine answers a ValueError with -EINVAL).
    assert not issubclass(LifecycleError, ValueError)


@pytest.mark.parametrize("request_type", [t for t in RequestType if t is not T.CTR])
def test_the_engine_consults_the_table_for_every_request(request_type: RequestType) -> None:
    """An instance in a state the table does not list for the request: the engine raises the
    bug instead of answering (the daemon logs it as a bug and answers -EIO)."""
    engine = Applier.over(MemoryBackend(Path("/nonexistent")), boot_id="b")
    k = Kernel(engine)
    k.up()
    engine.table[(k.uuid, k.luid)].state = State.DESTROYED
    with pytest.raises(LifecycleError):
        k.send(request_type, b"")


def test_ctr_rule() -> None:
    assert lc.ctr_action(False, False, False) is lc.CtrAction.CREATE
    for same, resumed in itertools.product((False, True), repeat=2):
        expected_action = lc.CtrAction.ACCEPT if same or resumed else lc.CtrAction.REPLACE
        assert lc.ctr_action(True, same, resumed) is expected_action


def test_the_table_lists_exactly_the_states_between_ctr_and_dtr() -> None:
    assert set(lc.TRANSITIONS) == set(itertools.product(EXISTING, RequestType))
    assert set(EXISTING) == lc.HANDS_OVER | lc.IN_USE and not lc.HANDS_OVER & lc.IN_USE
    assert [s for s in State if lc.gives_resync_work(s)] == [State.LIVE]


# --- the engine follows the table -----------------------------------------------------------------


class EventLog(MemoryBackend):
    """Keeps the state every lifecycle journal record carries."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))  # the memory backend writes nothing
        self.events: list[tuple[int, str]] = []

    def log_event(self, rec: InstanceRecord, event: int) -> int:
        self.events.append((event, rec.state))
        return 0


REQUESTS = [T.RESUME, T.PRESUSPEND, T.POSTSUSPEND, T.GET_SYNC_COUNT, T.STATUS_INFO, T.FLUSH,
            T.GET_RESYNC_WORK, T.CTR]


@given(st.lists(st.sampled_from(REQUESTS), max_size=12))
def test_the_engine_moves_an_instance_by_the_table(requests: list[RequestType]) -> None:
    backend = EventLog()
    engine = Applier.over(backend, boot_id="b")
    k = Kernel(engine, uuid="LVM-lifecycle", luid=7, ctr="4096 core 8")
    k.ctr()
    state = State.CONSTRUCTED
    for request in requests:
        if request is T.CTR:
            k.ctr()
        else:
            k.ok(request)
        state = lc.next_state(state, request)
        assert engine.table[("LVM-lifecycle", 7)].state is state
    k.dtr()
    assert ("LVM-lifecycle", 7) not in engine.table
    # DESTROYED is seen: the DTR's journal record carries it.
    assert backend.events[-1][1] == State.DESTROYED


# --- one uuid ----------------------------------------------------------------------------------------


@dataclass
class Holder:
    luid: int
    state: State
    generation: int
    resumed: bool = True
    heard: bool = True


@dataclass
class Gone:
    generation: int


holders = st.builds(Holder, luid=st.integers(1, 4), state=st.sampled_from(EXISTING),
                    generation=st.integers(0, 6), resumed=st.booleans(), heard=st.booleans())
gone_states = st.builds(Gone, generation=st.integers(0, 6))


@given(luid=st.integers(1, 4), generation=st.integers(0, 6), instances=st.lists(holders, max_size=5),
       gone=st.lists(gone_states, max_size=3))
def test_the_newest_state_is_the_highest_generation_above_ours(luid, generation, instances, gone) -> None:
    candidates = [h for h in instances if h.luid != luid and h.resumed] + gone
    top = max((c.generation for c in candidates), default=-1)
    best = lc.newest_state(luid, generation, instances, gone)
    if top <= generation:
        assert best is None
    else:
        # The first candidate at the top generation: instances before gone states.
        assert best is next(c for c in candidates if c.generation == top)


@pytest.mark.parametrize(("state", "heard", "reconnect"),
                         list(itertools.product(EXISTING, (True, False), (True, False))))
def test_who_hands_over(state: State, heard: bool, reconnect: bool) -> None:
    holder = Holder(luid=1, state=state, generation=3, heard=heard)
    silent = state in (State.LIVE, State.PRESUSPENDED) and not heard and not reconnect
    assert lc.is_silent(holder, reconnect) is silent
    assert lc.hands_over(holder, reconnect) is (state in (State.SUSPENDED, State.CONSTRUCTED) or silent)


@pytest.mark.parametrize("mode", ["default", "sync", "nosync"])
def test_only_the_first_resume_of_a_sync_log_starts_over(mode: str) -> None:
    assert lc.forces_resync(True, mode) is (mode == "sync")
    assert not lc.forces_resync(False, mode)


@given(st.booleans(), st.booleans(), st.booleans())
def test_only_the_uuids_state_takes_a_generation(changed: bool, resumed: bool, superseded: bool) -> None:
    assert lc.takes_generation(changed, resumed, superseded) is (changed and resumed and not superseded)


@given(resumed=st.booleans(), superseded=st.booleans(), generation=st.integers(0, 9),
       others=st.lists(st.integers(0, 9), max_size=4))
def test_a_retained_state_is_never_passed_over(resumed, superseded, generation, others) -> None:
    """What DTR retains takes the next generation; no RESUME then prefers anything else."""
    newest_elsewhere = max(others, default=0)
    retains = lc.retains_at_dtr(resumed, superseded, generation, newest_elsewhere)
    assert retains is (resumed and not superseded and generation >= newest_elsewhere)
    if retains:
        retained = max([generation, *others]) + 1
        assert not lc.never_handed_over(False, True, False, retained, others)
        assert lc.newest_state(0, 0, [], [Gone(g) for g in [*others, retained]]).generation == retained


@given(resumed=st.booleans(), generation=st.integers(0, 9), retained=st.none() | st.integers(0, 9))
def test_a_reused_luid_keeps_only_a_newer_state(resumed, generation, retained) -> None:
    kept = lc.replaces_retained(resumed, generation, retained)
    assert kept is (resumed and (retained is None or generation > retained))


@pytest.mark.parametrize(("earlier", "reuses", "in_table"),
                         list(itertools.product((True, False), repeat=3)))
def test_only_an_adopted_earlier_boot_instance_is_dropped(earlier, reuses, in_table) -> None:
    assert lc.drops_adopted(earlier, reuses, in_table) is (earlier and not reuses and not in_table)


@given(flagged=st.booleans(), resumed=st.booleans(), in_use=st.booleans(), generation=st.integers(0, 9),
       others=st.lists(st.integers(0, 9), max_size=4))
def test_a_stored_state_is_passed_over_when_flagged_or_older_and_unused(
        flagged, resumed, in_use, generation, others) -> None:
    newer = any(g > generation for g in others)
    assert lc.never_handed_over(flagged, resumed, in_use, generation, others) is (
        flagged or (resumed and not in_use and newer))


def test_a_stored_instance_past_its_dtr_is_not_restored() -> None:
    """No daemon writes an instance after its DTR; a record that says so is damaged or foreign:
    it is left out of the table (every request for its luid would be a bug), and the kernel may
    construct that luid again."""
    from ulog_disk.log.engine import Engine
    from ulog_disk.log.records import Restored, StoredInstance

    rec = InstanceRecord(uuid="LVM-x", luid=7, ctr="64 clustered-core 8", log_type="clustered-core",
                         region_size=8, region_count=8, state="destroyed", generation=3, cursor=0,
                         boot_id="b", resumed=True)
    engine = Engine("b")
    engine.load(Restored(instances=[StoredInstance(rec, b"\xff", b"\xff")]))
    assert ("LVM-x", 7) not in engine.table
    applier = Applier(engine, MemoryBackend(Path("/nonexistent")))
    k = Kernel(applier, uuid="LVM-x", luid=7, ctr="64 clustered-core 8")
    k.up()
    assert engine.table[("LVM-x", 7)].state is State.LIVE
