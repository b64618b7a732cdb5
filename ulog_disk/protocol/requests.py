"""The request table: every fact about each of the protocol's request types, one row per type.

Everything else that depends on a request's type is derived from this table: what its payloads
are (``wire`` parses them), which requests the kernel re-registers a log for after -ESRCH, the
lifecycle rule the engine applies (:mod:`ulog_disk.log.lifecycle` builds its transition table from
the ``lifecycle`` column), which handler of the engine serves it, whether it writes anything
(the daemon holds the writers back while the state disk stalls), when it is answered, the code
its journal record carries, and whether a cluster answers it locally or agrees on it first.

Columns (protocol ref §1.7, §3, §4; ``formats/wire.md`` §4; ``formats/journal.md``):

``payloads``
    What the request and its successful reply carry (``None``: nothing, ``data_size`` 0). An
    error reply carries nothing, and neither does the reconnect CTR's reply.
``reregisters``
    Sent through the kernel's ``userspace_do_request`` loop: an -ESRCH answer makes the kernel
    send CTR (+NUL) and RESUME for the log again, then retry. An unknown log gets -ESRCH for
    these and -EINVAL for the rest.
``lifecycle``
    What the request does to the instance's state (:class:`Lifecycle`).
``handler``
    The engine's method that serves it (``Engine._<handler>``).
``writes``
    Whether serving it can write the journal or a store. A test checks this against the effects
    the handler emits.
``answered``
    When the reply goes out: at once, once the journal is durable up to its record, or once its
    store write has run (:class:`Answered`). A FLUSH of a log whose journal missed a change is
    answered after a store write instead, and the kernel's reconnect RESUME of a log resumed
    before, which changes nothing stored but what a FLUSH record carries, once the journal is
    durable (``Engine._reconnect_resume``): the engine says so per request.
``journal_event``
    The event code its journal record carries (``formats/journal.md``: 1 CTR, 2 RESUME,
    4 POSTSUSPEND, 5 DTR; code 3 is reserved for PRESUSPEND, which changes nothing a restart
    needs and is not journaled), or ``None``.
``cluster``
    In cluster mode: answered from the local replica, or multicast in agreed order and applied
    by every node before the originating node answers (:class:`Scope`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import wire
from .wire import Payload, RequestType


class Lifecycle(enum.Enum):
    """A request's effect on the state of the instance it names."""

    #: Creates the instance (or accepts a repeat; the CTR rule of :mod:`.lifecycle`).
    CREATES = "creates"
    #: Ends it from any state.
    ENDS = "ends"
    #: Makes it live from any state.
    RESUMES = "resumes"
    #: Stops recovery: live → presuspended.
    PRESUSPENDS = "presuspends"
    #: Ends a suspend: live or presuspended → suspended.
    POSTSUSPENDS = "postsuspends"
    #: Leaves the state alone.
    NONE = "none"


class Answered(enum.Enum):
    AT_ONCE = "at once"
    DURABLE = "after the journal is durable up to its record"
    STORED = "after its store write"


class Scope(enum.Enum):
    #: Answered by the node that received it, from its own replica (or bound to one machine).
    LOCAL = "local"
    #: Changes state every node shares: agreed through the cluster before it is answered.
    AGREED = "agreed"


@dataclass(frozen=True, slots=True)
class Payloads:
    """What a request type carries each way (None: nothing, ``data_size`` 0). Any payload may
    also be absent: an error reply, the reconnect CTR's reply, a FLUSH without
    ``integrated_flush`` carry none (the engine decides which absences are errors)."""

    request: Payload | None = None
    reply: Payload | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    type: RequestType
    payloads: Payloads
    reregisters: bool
    lifecycle: Lifecycle
    handler: str
    writes: bool
    answered: Answered
    journal_event: int | None
    cluster: Scope


_REGION, _REGIONS, _SET_REGION_SYNC = wire.REGION, wire.REGIONS, wire.SET_REGION_SYNC
_U64, _S64 = wire.U64_VALUE, wire.S64_VALUE
_RESYNC_WORK, _REMOTE_RECOVERING = wire.RESYNC_WORK, wire.REMOTE_RECOVERING
_STATUS = wire.StatusText

T, L, A, S = RequestType, Lifecycle, Answered, Scope

#: type: payloads, reregisters, lifecycle, handler, writes, answered, journal event, cluster
_ROWS: list[tuple[RequestType, Payloads, bool, Lifecycle, str, bool, Answered, int | None, Scope]] = [
    (T.CTR, Payloads(Payload("CTR request", wire.CtrString), Payload("CTR reply", wire.DeviceName)),
     False, L.CREATES, "ctr", True, A.STORED, 1, S.LOCAL),
    (T.DTR, Payloads(), False, L.ENDS, "dtr", True, A.STORED, 5, S.LOCAL),
    (T.PRESUSPEND, Payloads(), False, L.PRESUSPENDS, "presuspend", False, A.AT_ONCE, None, S.LOCAL),
    (T.POSTSUSPEND, Payloads(), False, L.POSTSUSPENDS, "postsuspend", True, A.STORED, 4, S.LOCAL),
    (T.RESUME, Payloads(), False, L.RESUMES, "resume", True, A.STORED, 2, S.AGREED),
    (T.GET_REGION_SIZE, Payloads(reply=_U64), False, L.NONE, "get_region_size", False, A.AT_ONCE, None,
     S.LOCAL),
    (T.IS_CLEAN, Payloads(_REGION, _S64), True, L.NONE, "is_clean", False, A.AT_ONCE, None, S.LOCAL),
    (T.IN_SYNC, Payloads(_REGION, _S64), True, L.NONE, "in_sync", False, A.AT_ONCE, None, S.LOCAL),
    (T.FLUSH, Payloads(_REGIONS), True, L.NONE, "flush", True, A.DURABLE, None, S.AGREED),
    (T.MARK_REGION, Payloads(_REGIONS), True, L.NONE, "mark", True, A.AT_ONCE, None, S.AGREED),
    (T.CLEAR_REGION, Payloads(_REGIONS), True, L.NONE, "clear", True, A.AT_ONCE, None, S.AGREED),
    (T.GET_RESYNC_WORK, Payloads(reply=_RESYNC_WORK), True, L.NONE, "get_resync_work", False, A.AT_ONCE,
     None, S.AGREED),
    (T.SET_REGION_SYNC, Payloads(_SET_REGION_SYNC), True, L.NONE, "set_region_sync", True, A.AT_ONCE, None,
     S.AGREED),
    (T.GET_SYNC_COUNT, Payloads(reply=_U64), True, L.NONE, "get_sync_count", False, A.AT_ONCE, None,
     S.LOCAL),
    (T.STATUS_INFO, Payloads(reply=Payload("STATUS_INFO reply", _STATUS)), True, L.NONE, "status_info",
     False, A.AT_ONCE, None, S.LOCAL),
    (T.STATUS_TABLE, Payloads(reply=Payload("STATUS_TABLE reply", _STATUS)), False, L.NONE,
     "status_table", False, A.AT_ONCE, None, S.LOCAL),
    (T.IS_REMOTE_RECOVERING, Payloads(_REGION, _REMOTE_RECOVERING), True, L.NONE, "is_remote_recovering",
     False, A.AT_ONCE, None, S.LOCAL),
]

#: The table, by type: every :class:`RequestType` has exactly one row.
REQUESTS: dict[RequestType, RequestFacts] = {row[0]: RequestFacts(*row) for row in _ROWS}
assert len(REQUESTS) == len(_ROWS) and set(REQUESTS) == set(RequestType)

# --- derived -------------------------------------------------------------------------------------

#: Requests an unknown log answers with -ESRCH, so that the kernel re-registers it.
REREGISTERS = frozenset(t for t, f in REQUESTS.items() if f.reregisters)
#: Requests whose handling writes nothing: answered while the state disk stalls.
WRITES_NOTHING = frozenset(t for t, f in REQUESTS.items() if not f.writes)
#: The same, as plain integers (the daemon's per-frame test, before the type is validated).
WRITES_NOTHING_NUMBERS = frozenset(int(t) for t in WRITES_NOTHING)
#: Requests that change shared state: agreed through the cluster first.
AGREED = frozenset(t for t, f in REQUESTS.items() if f.cluster is Scope.AGREED)
#: Request type of each journal event code.
BY_JOURNAL_EVENT = {f.journal_event: t for t, f in REQUESTS.items() if f.journal_event is not None}


def _payload(request_type: int, reply: bool) -> tuple[str, Payload | None]:
    kind = wire.request_kind(request_type)
    name = kind.name if kind is not None else f"request type {request_type & wire.DM_ULOG_REQUEST_MASK}"
    what = f"{name} {'reply' if reply else 'request'}"
    if kind is None:
        return what, None
    payloads = REQUESTS[kind].payloads
    return what, payloads.reply if reply else payloads.request


def parse_payload(request_type: int, data: bytes, *, reply: bool = False) -> dict[str, Any]:
    """A request's (or a reply's) data as the table names its fields; no data is ``{}``.
    Raises ValueError for data that does not fit the type's definition."""
    what, payload = _payload(request_type, reply)
    if not data:
        return {}
    if payload is None:
        raise ValueError(f"{what} carries no payload, got {len(data)} bytes")
    return payload.parse(data)


def build_payload(request_type: int, fields: Mapping[str, Any], *, reply: bool = False) -> bytes:
    """The data of a request (or a reply) from its named fields; ``{}`` is no data."""
    what, payload = _payload(request_type, reply)
    if not fields:
        return b""
    if payload is None:
        raise ValueError(f"{what} carries no payload")
    return payload.build(fields)
