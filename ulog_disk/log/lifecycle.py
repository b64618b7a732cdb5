"""The rules of a log's life: one instance's states, and what the instances of one uuid owe each other.

The engine applies these rules and ``ulog-recover``/``ulog-dump`` give their verdicts with them;
neither re-derives them, and a backend only stores what the engine decided.

**One instance** (keyed by uuid and luid; protocol ref §5):

* CTR creates an instance in CONSTRUCTED; a CTR for an instance that exists changes nothing and
  succeeds (the kernel's reconnect loop may send several, one per kernel thread) — unless it
  never resumed and the CTR carries another constructor: the kernel reused the luid of a context
  that died without a DTR, and a new instance replaces it.
* RESUME makes an instance LIVE from any state, including LIVE: the kernel's reconnect path sends
  RESUME without a suspend, and a resent RESUME must be harmless.
* PRESUSPEND stops recovery (LIVE → PRESUSPENDED); POSTSUSPEND ends it (→ SUSPENDED).
  A suspend request in a state it does not apply to is accepted and changes nothing: the kernel
  only logs a warning on failure, and refusing would gain nothing.
* DTR ends the instance from any state (DTR of a live log happens on device removal of a
  suspended device and when a constructor fails). DESTROYED is the state the DTR's journal
  record carries; the instance leaves the table with it, and nothing is accepted after it.
* Every other request leaves the state alone. GET_REGION_SIZE, GET_SYNC_COUNT, STATUS_INFO,
  IS_CLEAN, IN_SYNC and MARK/CLEAR/FLUSH are accepted in every state between CTR and DTR
  (an inactive table's kmirrord pass and late clears after POSTSUSPEND send them).
* GET_RESYNC_WORK hands out work only while LIVE (the kernel asks only between RESUME and
  PRESUSPEND; a late repeat must not start a recovery on a suspending log).

A request a state does not list in :data:`TRANSITIONS` raises :class:`LifecycleError`.

**One uuid** (protocol ref §5.4-§5.7). Two instances of a uuid never share state; a
resuming one may *copy* the uuid's newest state (hand-over). Generations say which is newest:

* **Generations.** A commit of changed state takes the uuid's next generation when the state is
  the uuid's (the instance has resumed and nobody adopted it); so does a RESUME that adopted a
  state or threw one away ('sync'). A never-resumed instance has generation 0.
* **Hand-over at RESUME.** The uuid's newest state is the one with the highest generation above
  the resuming instance's own, among the other *resumed* instances and the *gone* states (the
  retained state, instances of earlier boots); ties go to the instances. It is adopted when its
  holder is not in use by the kernel: gone, SUSPENDED, or CONSTRUCTED (an inactive table). A
  LIVE or PRESUSPENDED holder keeps it — and nothing older is adopted instead, since that
  holder's state is the one to take over later — with one exception: a holder restored from the
  store that the kernel has not spoken for since, met by a real (not reconnect) RESUME. A table
  swap suspends the old table first, and this daemon would have seen it; so that holder's kernel
  side is gone (removed while the daemon was down, its DTR lost). An adopted holder is flagged
  *superseded*: whatever it still receives never makes its state the uuid's newest again, until
  it resumes itself. The first RESUME of a 'sync' log adopts nothing: it starts from a full
  resync.
* **Retention at DTR.** A DTR'd instance whose state is the uuid's (resumed, not superseded) and
  at least as new as every other state of the uuid leaves it behind as the uuid's *retained*
  state, at the next generation: a ``dmsetup remove`` + ``create`` resyncs nothing.
* **Adoption after another boot.** Instances found in the store under another boot id are gone
  (their kernel is): their states are hand-over candidates only. One whose state was adopted is
  removed from the store once the adopter's state is committed (or every reboot would leave one
  more), unless the adopter reuses its luid or the luid is live again. When the kernel reuses such
  an instance's luid at CTR, its state — if it was resumed and is newer than the retained
  state — becomes the retained state in the same write, so a crash before the new instance's
  RESUME does not lose it; ``ulog-recover purge`` keeps the state of an instance it removes by
  the same rule (when it is the uuid's newest).
* **Verdicts on a store** (``ulog-recover list``): a state is never handed over again once it is
  flagged superseded, or once it is not in use in this boot and another state of the uuid is
  newer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Protocol, TypeVar

from ..protocol.requests import REQUESTS, Lifecycle
from ..protocol.wire import RequestType


class State(enum.StrEnum):
    CONSTRUCTED = "constructed"
    LIVE = "live"
    PRESUSPENDED = "presuspended"
    SUSPENDED = "suspended"
    DESTROYED = "destroyed"


class LifecycleError(Exception):
    """A request that the instance's state does not list: a bug in whoever sent it there (not
    a ValueError, so that it is never mistaken for a request the kernel got wrong)."""


#: The states between CTR and DTR.
EXISTING = (State.CONSTRUCTED, State.LIVE, State.PRESUSPENDED, State.SUSPENDED)
#: States in which the kernel uses the instance's state: it is never handed over from them.
IN_USE = frozenset({State.LIVE, State.PRESUSPENDED})
#: States whose holder gives the uuid's newest state to a resuming instance.
HANDS_OVER = frozenset(EXISTING) - IN_USE

#: What each lifecycle rule of the request table does, state by state (a state not listed:
#: the request leaves it alone).
_RULES: dict[Lifecycle, dict[State, State]] = {
    Lifecycle.CREATES: {},
    Lifecycle.NONE: {},
    Lifecycle.RESUMES: {s: State.LIVE for s in EXISTING},
    Lifecycle.PRESUSPENDS: {State.LIVE: State.PRESUSPENDED},
    Lifecycle.POSTSUSPENDS: {State.LIVE: State.SUSPENDED, State.PRESUSPENDED: State.SUSPENDED},
    Lifecycle.ENDS: {s: State.DESTROYED for s in EXISTING},
}

#: (state, request) → next state, for every request of the table in every state between CTR and
#: DTR. A pair not listed raises.
TRANSITIONS: dict[tuple[State, RequestType], State] = {
    (s, kind): _RULES[facts.lifecycle].get(s, s) for s in EXISTING for kind, facts in REQUESTS.items()
}


def next_state(state: State, request: RequestType) -> State:
    try:
        return TRANSITIONS[(state, request)]
    except KeyError:
        raise LifecycleError(f"{request.name} is not accepted in state {state}") from None


class CtrAction(enum.Enum):
    #: No instance has the key: a new one.
    CREATE = "create"
    #: The instance exists: the CTR changes nothing and succeeds.
    ACCEPT = "accept"
    #: A never-resumed instance whose luid the kernel reuses with another constructor.
    REPLACE = "replace"


def ctr_action(exists: bool, same_constructor: bool, resumed: bool) -> CtrAction:
    """What a CTR does to the instance its key names (the first rule of the module's docstring)."""
    if not exists:
        return CtrAction.CREATE
    if same_constructor or resumed:
        return CtrAction.ACCEPT
    return CtrAction.REPLACE


def gives_resync_work(state: State) -> bool:
    return state is State.LIVE


# --- one uuid ------------------------------------------------------------------------------------


class Holder(Protocol):
    """An instance of the uuid in the table, as the hand-over rule sees it."""

    @property
    def luid(self) -> int: ...
    @property
    def state(self) -> State: ...
    @property
    def generation(self) -> int: ...
    @property
    def resumed(self) -> bool: ...
    @property
    def heard(self) -> bool: ...


class Gone(Protocol):
    """A state whose instance is gone (the retained state, an instance of an earlier boot)."""

    @property
    def generation(self) -> int: ...


H = TypeVar("H", bound=Holder)
G = TypeVar("G", bound=Gone)


def forces_resync(first_resume: bool, sync_mode: str) -> bool:
    """Whether a RESUME throws the state away instead of adopting one ('sync' in the CTR)."""
    return first_resume and sync_mode == "sync"


def takes_generation(changed: bool, resumed: bool, superseded: bool) -> bool:
    """Whether a commit gives the instance the uuid's next generation."""
    return changed and resumed and not superseded


def newest_state(luid: int, generation: int, instances: Iterable[H], gone: Iterable[G]) -> H | G | None:
    """The uuid's newest state above ``generation`` (the resuming instance's own), if any:
    another resumed instance's or a gone one's; on a tie the first found, instances first."""
    best_generation, best = generation, None
    for other in instances:
        if other.luid != luid and other.resumed and other.generation > best_generation:
            best_generation, best = other.generation, other
    for state in gone:
        if state.generation > best_generation:
            best_generation, best = state.generation, state
    return best


def is_silent(holder: Holder, reconnect: bool) -> bool:
    """An in-use holder whose kernel side is gone: restored, unheard since, and the RESUME that
    meets it is a real one."""
    return holder.state in IN_USE and not holder.heard and not reconnect


def hands_over(holder: Holder, reconnect: bool) -> bool:
    """Whether an instance holding the uuid's newest state gives it to a resuming one."""
    return holder.state in HANDS_OVER or is_silent(holder, reconnect)


def retains_at_dtr(resumed: bool, superseded: bool, generation: int, newest_elsewhere: int) -> bool:
    """Whether a DTR'd instance's state becomes the uuid's retained state."""
    return resumed and not superseded and generation >= newest_elsewhere


def drops_adopted(of_earlier_boot: bool, adopter_reuses_luid: bool, luid_in_table: bool) -> bool:
    """Whether the instance whose state was adopted is removed from the store (once the
    adopter's state is committed)."""
    return of_earlier_boot and not adopter_reuses_luid and not luid_in_table


def replaces_retained(resumed: bool, generation: int, retained_generation: int | None) -> bool:
    """Whether the state of an instance removed without its DTR (an earlier boot's whose luid a
    CTR reuses, or one ``ulog-recover purge`` removes) becomes the uuid's retained state
    (``retained_generation``: None when the uuid has none, or none that can be read)."""
    return resumed and (retained_generation is None or generation > retained_generation)


def outranked(generation: int, others: Iterable[int]) -> bool:
    """Whether another state of the uuid (``others``: their generations) is newer."""
    return any(g > generation for g in others)


def never_handed_over(flagged: bool, resumed: bool, in_use: bool, generation: int,
                      others: Iterable[int]) -> bool:
    """A stored state no RESUME will adopt again: flagged superseded, or not in use in this boot
    while another state of the uuid is newer."""
    return flagged or (resumed and not in_use and outranked(generation, others))
