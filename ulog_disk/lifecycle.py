"""Lifecycle of one log instance, as one transition table.

Rules (protocol ref §5):

* CTR creates an instance in CONSTRUCTED; a CTR for an instance that exists changes nothing and
  succeeds (the kernel's reconnect loop may send several, one per kernel thread).
* RESUME makes an instance LIVE from any state, including LIVE: the kernel's reconnect path sends
  RESUME without a suspend, and a resent RESUME must be harmless.
* PRESUSPEND stops recovery (LIVE → PRESUSPENDED); POSTSUSPEND ends it (→ SUSPENDED).
  A suspend request in a state it does not apply to is accepted and changes nothing: the kernel
  only logs a warning on failure, and refusing would gain nothing.
* DTR ends the instance from any state (DTR of a live log happens on device removal of a
  suspended device and when a constructor fails).
* Every other request leaves the state alone. GET_REGION_SIZE, GET_SYNC_COUNT, STATUS_INFO,
  IS_CLEAN, IN_SYNC and MARK/CLEAR/FLUSH are accepted in every state between CTR and DTR
  (an inactive table's kmirrord pass and late clears after POSTSUSPEND send them).
* GET_RESYNC_WORK hands out work only while LIVE (the kernel asks only between RESUME and
  PRESUSPEND; a late repeat must not start a recovery on a suspending log).

A state's "owner of the uuid's newest state" role (hand-over) is decided by the engine from
these states: only SUSPENDED instances (and instances that are gone) may give their state to a
resuming one; LIVE and PRESUSPENDED ones never do.
"""

from __future__ import annotations

import enum

from .wire import RequestType


class State(enum.StrEnum):
    CONSTRUCTED = "constructed"
    LIVE = "live"
    PRESUSPENDED = "presuspended"
    SUSPENDED = "suspended"
    DESTROYED = "destroyed"


_ANY = (State.CONSTRUCTED, State.LIVE, State.PRESUSPENDED, State.SUSPENDED)

#: (state, request) → next state. Pairs absent from the table leave the state unchanged.
TRANSITIONS: dict[tuple[State, RequestType], State] = {
    **{(s, RequestType.RESUME): State.LIVE for s in _ANY},
    (State.LIVE, RequestType.PRESUSPEND): State.PRESUSPENDED,
    (State.LIVE, RequestType.POSTSUSPEND): State.SUSPENDED,
    (State.PRESUSPENDED, RequestType.POSTSUSPEND): State.SUSPENDED,
    **{(s, RequestType.DTR): State.DESTROYED for s in _ANY},
}

#: States whose state may be handed over to a resuming instance of the same uuid.
HANDS_OVER = frozenset({State.SUSPENDED, State.CONSTRUCTED})


def next_state(state: State, request: RequestType) -> State:
    return TRANSITIONS.get((state, request), state)


def gives_resync_work(state: State) -> bool:
    return state is State.LIVE
