"""A ctypes binding to corosync's closed process groups (libcpg) and quorum service (libquorum).

Cluster mode agrees on one stream of log requests through a CPG with ``CPG_TYPE_AGREED``: every
member receives every message, in the same order, with the membership changes at the same places
in that order. There is no maintained Python binding, so this module declares the few calls a
daemon needs (``include/corosync/cpg.h``, ``quorum.h`` and ``corotypes.h`` of corosync 3.1) and
wraps them in two classes:

* :class:`CpgGroup`: one CPG connection joined to one group (corosync allows one group per
  connection). :meth:`CpgGroup.fileno` is the descriptor to poll; when it is readable,
  :meth:`CpgGroup.dispatch` runs ``cpg_dispatch(CS_DISPATCH_ALL)`` and returns what arrived as
  values (:class:`Deliver`, :class:`ConfChange`, :class:`TotemChange`). No thread, no callback
  into the caller's code: the C callbacks only copy their arguments into a list, because an
  exception raised inside a ctypes callback is printed and swallowed, never seen by the caller.
* :class:`Quorum`: the quorum service's descriptor, the last known ``quorate``, its changes as
  :class:`QuorumChange` values.

Sending never sleeps. ``cpg_mcast_joined`` returns ``CS_ERR_TRY_AGAIN`` when corosync pushes back
(its IPC ring to us is full, or totem's send queue is: that is corosync's flow control, since
``cpg_flow_control_state_get`` of corosync 3 always says "disabled"); :meth:`CpgGroup.mcast` then
raises :class:`WouldBlock` carrying ``retry_after``, an exponential backoff (0.5 ms doubling to
10 ms, libcpg's own retry interval; reset by the next success). :meth:`CpgGroup.send` queues
instead and :meth:`CpgGroup.pump` sends what the queue holds in order until corosync pushes back;
the daemon's loop passes :meth:`CpgGroup.retry_in` as its selector timeout, so a blocked queue is
retried after the backoff without a busy loop and without blocking the loop for anything else.

No message above ``cpg_max_atomic_msgsize_get`` is handed to libcpg: above it libcpg splits the
message itself and then blocks the caller in 10 ms sleeps on every ``TRY_AGAIN`` (up to a second,
printing ``sleep. counter=N`` to stderr). :class:`MessageTooLarge` refuses such a message;
:func:`split` and :class:`Reassembler` carry a large payload in pieces below the limit instead.

The libraries are loaded at the first use, not at import of the daemon: the single-node daemon
never needs corosync. A missing library, corosync not running, or corosync refusing us raises
:class:`CorosyncUnavailable`, whose text is one line a program can print after its name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# --- corotypes.h ------------------------------------------------------------------------------

CS_OK = 1
CS_DISPATCH_ALL = 2
CS_TRACK_CURRENT = 0x01
CS_TRACK_CHANGES = 0x02

CS_ERRORS = {
    1: "CS_OK", 2: "CS_ERR_LIBRARY", 3: "CS_ERR_VERSION", 4: "CS_ERR_INIT", 5: "CS_ERR_TIMEOUT",
    6: "CS_ERR_TRY_AGAIN", 7: "CS_ERR_INVALID_PARAM", 8: "CS_ERR_NO_MEMORY",
    9: "CS_ERR_BAD_HANDLE", 10: "CS_ERR_BUSY", 11: "CS_ERR_ACCESS", 12: "CS_ERR_NOT_EXIST",
    13: "CS_ERR_NAME_TOO_LONG", 14: "CS_ERR_EXIST", 15: "CS_ERR_NO_SPACE", 16: "CS_ERR_INTERRUPT",
    17: "CS_ERR_NAME_NOT_FOUND", 18: "CS_ERR_NO_RESOURCES", 19: "CS_ERR_NOT_SUPPORTED",
    20: "CS_ERR_BAD_OPERATION", 21: "CS_ERR_FAILED_OPERATION", 22: "CS_ERR_MESSAGE_ERROR",
    23: "CS_ERR_QUEUE_FULL", 24: "CS_ERR_QUEUE_NOT_AVAILABLE", 25: "CS_ERR_BAD_FLAGS",
    26: "CS_ERR_TOO_BIG", 27: "CS_ERR_NO_SECTIONS", 28: "CS_ERR_CONTEXT_NOT_FOUND",
    30: "CS_ERR_TOO_MANY_GROUPS", 100: "CS_ERR_SECURITY",
}
CS_ERR_LIBRARY = 2
CS_ERR_TRY_AGAIN = 6
CS_ERR_BAD_HANDLE = 9
CS_ERR_ACCESS = 11
CS_ERR_NOT_EXIST = 12
CS_ERR_NAME_TOO_LONG = 13
CS_ERR_TOO_BIG = 26


def cs_error_name(code: int) -> str:
    return CS_ERRORS.get(code, f"cs_error {code}")


# --- cpg.h --------------------------------------------------------------------------------------

CPG_TYPE_AGREED = 2
CPG_FLOW_CONTROL_ENABLED = 1
CPG_MODEL_V1 = 1
#: Deliver the current totem membership once at join, so a member knows the ring it joined in.
CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF = 0x01
CPG_MAX_NAME_LENGTH = 128


class Reason(enum.IntEnum):
    """Why a member is in a :class:`ConfChange`'s left or joined list (``cpg_reason_t``)."""

    UNDEFINED = 0
    JOIN = 1
    LEAVE = 2        # it called cpg_leave or cpg_finalize
    NODEDOWN = 3     # its node left the totem membership (corosync dead, node dead, partition)
    NODEUP = 4       # its node joined the totem membership
    PROCDOWN = 5     # its process died without leaving (its IPC connection closed)


class _CpgName(ctypes.Structure):
    _fields_ = [("length", ctypes.c_uint32), ("value", ctypes.c_char * CPG_MAX_NAME_LENGTH)]


class _CpgAddress(ctypes.Structure):
    _fields_ = [("nodeid", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("reason", ctypes.c_uint32)]


class _CpgRingId(ctypes.Structure):
    _fields_ = [("nodeid", ctypes.c_uint32), ("seq", ctypes.c_uint64)]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_DELIVER_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.POINTER(_CpgName), ctypes.c_uint32,
                               ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
_CONFCHG_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.POINTER(_CpgName),
                               ctypes.POINTER(_CpgAddress), ctypes.c_size_t,
                               ctypes.POINTER(_CpgAddress), ctypes.c_size_t,
                               ctypes.POINTER(_CpgAddress), ctypes.c_size_t)
# The ring id is passed BY VALUE (a 16-byte struct): declaring it a pointer reads garbage.
_TOTEM_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, _CpgRingId, ctypes.c_uint32,
                             ctypes.POINTER(ctypes.c_uint32))


class _CpgModelV1(ctypes.Structure):
    _fields_ = [("model", ctypes.c_int), ("cpg_deliver_fn", _DELIVER_FN),
                ("cpg_confchg_fn", _CONFCHG_FN), ("cpg_totem_confchg_fn", _TOTEM_FN),
                ("flags", ctypes.c_uint)]


# --- quorum.h -----------------------------------------------------------------------------------

QUORUM_SET = 1
_QUORUM_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64,
                              ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))


class _QuorumCallbacks(ctypes.Structure):
    _fields_ = [("quorum_notify_fn", _QUORUM_FN)]


# --- errors -------------------------------------------------------------------------------------


class CorosyncError(Exception):
    """A libcpg or libquorum call failed: ``call`` names it, ``code`` is its ``cs_error_t``,
    ``name`` the constant's name (``CS_ERR_...``); ``str()`` says both."""

    def __init__(self, call: str, code: int, detail: str = "") -> None:
        self.call = call
        self.code = code
        self.name = cs_error_name(code)
        #: From a failed dispatch: what it had delivered before the failure (apply them first).
        self.events: list[Any] = []
        text = f"{call}: {self.name}"
        super().__init__(f"{text} ({detail})" if detail else text)


class CorosyncUnavailable(CorosyncError):
    """Corosync cannot be used at all: its libraries are missing, it is not running, or it refuses
    this process. ``str()`` is one line meant to follow a program's name."""

    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(call, code)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


class WouldBlock(CorosyncError):
    """Corosync pushed back (``CS_ERR_TRY_AGAIN``, or flow control on): try again after
    ``retry_after`` seconds; nothing was sent."""

    def __init__(self, call: str, retry_after: float) -> None:
        super().__init__(call, CS_ERR_TRY_AGAIN, f"retry in {retry_after * 1000:.1f} ms")
        self.retry_after = retry_after


class ConnectionLost(CorosyncError):
    """The connection to corosync is gone (corosync died or was stopped): the handle is useless;
    a new one can be made once corosync runs again."""


class MessageTooLarge(CorosyncError):
    """A message above the CPG's atomic size, refused before libcpg could split it (and block)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("cpg_mcast_joined", CS_ERR_TOO_BIG,
                         f"{size} bytes, the atomic limit is {limit}: send it in pieces (split)")
        self.size = size
        self.limit = limit


# --- library loading ----------------------------------------------------------------------------

_LIBS: dict[str, ctypes.CDLL] = {}
_SONAMES = {"cpg": "libcpg.so.4", "quorum": "libquorum.so.5"}
_PACKAGES = {"cpg": "libcpg4", "quorum": "libquorum5"}


def _declare_cpg(lib: ctypes.CDLL) -> None:
    u64, u32, c_int = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    p = ctypes.POINTER
    for name, args in {
        "cpg_model_initialize": [p(u64), c_int, p(_CpgModelV1), ctypes.c_void_p],
        "cpg_finalize": [u64],
        "cpg_fd_get": [u64, p(c_int)],
        "cpg_max_atomic_msgsize_get": [u64, p(u32)],
        "cpg_dispatch": [u64, c_int],
        "cpg_join": [u64, p(_CpgName)],
        "cpg_leave": [u64, p(_CpgName)],
        "cpg_mcast_joined": [u64, c_int, p(_IoVec), ctypes.c_uint],
        "cpg_local_get": [u64, p(ctypes.c_uint)],
        "cpg_flow_control_state_get": [u64, p(c_int)],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = c_int


def _declare_quorum(lib: ctypes.CDLL) -> None:
    u64, u32, c_int = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    p = ctypes.POINTER
    for name, args in {
        "quorum_initialize": [p(u64), p(_QuorumCallbacks), p(u32)],
        "quorum_finalize": [u64],
        "quorum_fd_get": [u64, p(c_int)],
        "quorum_dispatch": [u64, c_int],
        "quorum_getquorate": [u64, p(c_int)],
        "quorum_trackstart": [u64, ctypes.c_uint],
        "quorum_trackstop": [u64],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = c_int


def load(which: str) -> ctypes.CDLL:
    """``libcpg`` (``which="cpg"``) or ``libquorum`` (``"quorum"``), loaded once; raises
    :class:`CorosyncUnavailable` when it is not installed."""
    lib = _LIBS.get(which)
    if lib is not None:
        return lib
    soname = _SONAMES[which]
    try:
        lib = ctypes.CDLL(soname)
    except OSError:
        found = ctypes.util.find_library(which)
        try:
            if found is None:
                raise OSError(soname)
            lib = ctypes.CDLL(found)
        except OSError:
            raise CorosyncUnavailable(
                f"load {soname}", CS_ERR_LIBRARY,
                f"cluster mode needs corosync's {soname}, which is not installed "
                f"(Debian: apt-get install corosync {_PACKAGES[which]})") from None
    (_declare_cpg if which == "cpg" else _declare_quorum)(lib)
    _LIBS[which] = lib
    return lib


def _connect_error(call: str, code: int, service: str) -> CorosyncUnavailable:
    if code == CS_ERR_ACCESS:
        why = (f"corosync refused this process ({cs_error_name(code)}): run as root, or allow "
               "its user or group in /etc/corosync/uidgid.d")
    elif code in (CS_ERR_LIBRARY, CS_ERR_NOT_EXIST, CS_ERR_TRY_AGAIN):
        why = (f"cannot connect to corosync's {service} service ({call}: {cs_error_name(code)}): "
               "is corosync running on this host?")
    else:
        why = f"cannot connect to corosync's {service} service ({call}: {cs_error_name(code)})"
    return CorosyncUnavailable(call, code, why)


def _check(call: str, code: int, events: Sequence[Any] = ()) -> None:
    """Raise for a failed call; ``events``: what a failed dispatch delivered before the failure,
    carried by the error (agreed, so the caller applies them first)."""
    if code == CS_OK:
        return
    if code in (CS_ERR_LIBRARY, CS_ERR_BAD_HANDLE):
        # libqb maps a closed or refused IPC connection (ENOTCONN, ECONNREFUSED, EPIPE) to
        # CS_ERR_LIBRARY; a finalized handle is CS_ERR_BAD_HANDLE.
        error: CorosyncError = ConnectionLost(call, code, "the connection to corosync is lost")
    else:
        error = CorosyncError(call, code)
    error.events = list(events)
    raise error


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A group member: the node's id and the member process's pid on that node."""

    nodeid: int
    pid: int
    reason: Reason = Reason.UNDEFINED

    @property
    def member(self) -> tuple[int, int]:
        return (self.nodeid, self.pid)


@dataclass(frozen=True)
class RingId:
    nodeid: int
    seq: int


@dataclass(frozen=True)
class Deliver:
    """A message, in agreed order; ``data`` is a copy owned by Python."""

    nodeid: int
    pid: int
    data: bytes


@dataclass(frozen=True)
class ConfChange:
    """The group's membership changed, at this point of the agreed order."""

    members: tuple[Address, ...]
    left: tuple[Address, ...]
    joined: tuple[Address, ...]


@dataclass(frozen=True)
class TotemChange:
    """The totem ring (the corosync nodes that see each other) changed; ``members`` are node ids."""

    ring: RingId
    members: tuple[int, ...]


CpgEvent = Deliver | ConfChange | TotemChange


@dataclass(frozen=True)
class QuorumChange:
    quorate: bool
    ring_seq: int
    members: tuple[int, ...]


_REASONS = {r.value for r in Reason}


def _addresses(array: Any, count: int) -> tuple[Address, ...]:
    return tuple(Address(array[i].nodeid, array[i].pid, Reason(array[i].reason)
                         if array[i].reason in _REASONS else Reason.UNDEFINED)
                 for i in range(count))


def _group_name(name: bytes | str) -> _CpgName:
    raw = name.encode() if isinstance(name, str) else bytes(name)
    if not raw or len(raw) > CPG_MAX_NAME_LENGTH:
        raise CorosyncError("cpg_join", CS_ERR_NAME_TOO_LONG,
                            f"a group name has 1 to {CPG_MAX_NAME_LENGTH} bytes, not {len(raw)}")
    out = _CpgName()
    out.length = len(raw)
    out.value = raw
    return out


# --- CPG ----------------------------------------------------------------------------------------

#: The backoff after CS_ERR_TRY_AGAIN: the first retry after RETRY_FIRST, doubling up to RETRY_MAX,
#: back to the start after a message goes through. RETRY_MAX is what libcpg itself sleeps between
#: retries: longer would only delay a request after corosync has room again, and a try that
#: fails costs one IPC attempt.
RETRY_FIRST = 0.0005
RETRY_MAX = 0.010


class SendQueue:
    """The queue of messages waiting to be multicast, oldest first, each checked against the
    group's atomic size when queued; :meth:`pump` (the subclass's) sends them."""

    max_atomic: int
    _queue: deque[bytes]

    def send(self, data: bytes) -> None:
        """Queue one message (checked against the atomic size now) for :meth:`pump`."""
        if len(data) > self.max_atomic:
            raise MessageTooLarge(len(data), self.max_atomic)
        self._queue.append(bytes(data))

    def send_many(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.send(piece)

    @property
    def pending(self) -> int:
        return len(self._queue)


class CpgGroup(SendQueue):
    """One connection to corosync's CPG service, joined to the group ``name``.

    Not thread-safe: one thread (the daemon's loop) makes every call. Construction connects and
    joins; :meth:`close` (or the ``with`` block's end) finalizes, which leaves the group.
    """

    def __init__(self, name: bytes | str, *, join: bool = True, join_timeout: float = 5.0) -> None:
        self._lib = load("cpg")
        self._name = _group_name(name)
        self.name = bytes(self._name.value[: self._name.length])
        self._events: list[CpgEvent] = []
        self._queue: deque[bytes] = deque()
        self._tries = 0            # consecutive CS_ERR_TRY_AGAIN
        self._retry_at = 0.0
        self.pid = os.getpid()
        self.closed = False
        self.lost = False
        self.counters = {"sent": 0, "delivered": 0, "try_again": 0, "flow_control": 0}
        # The callbacks are kept on the instance: libcpg holds only the raw pointers, and a
        # collected CFUNCTYPE object would leave it calling freed memory.
        self._model = _CpgModelV1(CPG_MODEL_V1, _DELIVER_FN(self._on_deliver),
                                  _CONFCHG_FN(self._on_confchg), _TOTEM_FN(self._on_totem),
                                  CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF)
        handle = ctypes.c_uint64()
        code = self._lib.cpg_model_initialize(ctypes.byref(handle), CPG_MODEL_V1,
                                              ctypes.byref(self._model), None)
        if code != CS_OK:
            raise _connect_error("cpg_model_initialize", code, "CPG")
        self._handle = handle.value
        try:
            fd = ctypes.c_int()
            _check("cpg_fd_get", self._lib.cpg_fd_get(self._handle, ctypes.byref(fd)))
            self._fd = fd.value
            size = ctypes.c_uint32()
            _check("cpg_max_atomic_msgsize_get",
                   self._lib.cpg_max_atomic_msgsize_get(self._handle, ctypes.byref(size)))
            self.max_atomic = size.value
            local = ctypes.c_uint()
            _check("cpg_local_get", self._lib.cpg_local_get(self._handle, ctypes.byref(local)))
            self.nodeid = local.value
            self.joined = False
            if join:
                self.join(timeout=join_timeout)
        except BaseException:
            self.close()
            raise

    # The C callbacks: copy, append, return. Nothing here may raise.

    def _on_deliver(self, _handle: int, _group: Any, nodeid: int, pid: int, msg: int,
                    size: int) -> None:
        self._events.append(Deliver(nodeid, pid, ctypes.string_at(msg, size) if size else b""))

    def _on_confchg(self, _handle: int, _group: Any, members: Any, n_members: int, left: Any,
                    n_left: int, joined: Any, n_joined: int) -> None:
        self._events.append(ConfChange(_addresses(members, n_members), _addresses(left, n_left),
                                       _addresses(joined, n_joined)))

    def _on_totem(self, _handle: int, ring: _CpgRingId, n_members: int, members: Any) -> None:
        self._events.append(TotemChange(RingId(ring.nodeid, ring.seq),
                                        tuple(members[i] for i in range(n_members))))

    # --- membership ---

    def join(self, timeout: float = 5.0) -> None:
        """Join the group. ``CS_ERR_TRY_AGAIN`` (this pid's previous leave of the same group not
        yet agreed) is retried with a backoff for up to ``timeout`` seconds: joining happens at
        start-up, before the loop serves anything."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            code = self._lib.cpg_join(self._handle, ctypes.byref(self._name))
            if code == CS_OK:
                self.joined = True
                return
            if code != CS_ERR_TRY_AGAIN or time.monotonic() + delay > deadline:
                if code == CS_ERR_ACCESS:
                    raise _connect_error("cpg_join", code, "CPG")
                _check("cpg_join", code)
                raise CorosyncError("cpg_join", code, f"gave up after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def leave(self) -> None:
        if self.joined and not self.lost:
            _check("cpg_leave", self._lib.cpg_leave(self._handle, ctypes.byref(self._name)))
        self.joined = False

    # --- the loop's side ---

    def fileno(self) -> int:
        """The descriptor to poll for reading; when readable, call :meth:`dispatch`."""
        return self._fd

    def dispatch(self) -> list[CpgEvent]:
        """Everything corosync has for us now, in agreed order (never blocks). Raises
        :class:`ConnectionLost` when corosync is gone; its ``events`` are those dispatched before
        the connection broke (agreed, so the caller applies them before it treats the loss as its
        own departure from the group)."""
        if self.closed:
            raise ConnectionLost("cpg_dispatch", CS_ERR_BAD_HANDLE, "the handle is closed")
        code = self._lib.cpg_dispatch(self._handle, CS_DISPATCH_ALL)
        events, self._events = self._events, []
        self.counters["delivered"] += sum(1 for e in events if isinstance(e, Deliver))
        if code != CS_OK:
            self.lost = True
            _check("cpg_dispatch", code, events)
        return events

    def flow_control(self) -> bool:
        """True when corosync asks us to stop sending (``cpg_flow_control_state_get``; corosync 3
        always answers "disabled" and pushes back with ``CS_ERR_TRY_AGAIN`` instead)."""
        state = ctypes.c_int()
        _check("cpg_flow_control_state_get",
               self._lib.cpg_flow_control_state_get(self._handle, ctypes.byref(state)))
        return state.value == CPG_FLOW_CONTROL_ENABLED

    def mcast(self, data: bytes | bytearray | memoryview | Sequence[bytes]) -> None:
        """Multicast one message (bytes, or a sequence of byte strings sent as one message) in
        agreed order, at once or not at all. Raises :class:`MessageTooLarge` above
        :attr:`max_atomic`, :class:`WouldBlock` when corosync pushes back (nothing sent; retry
        after ``retry_after``), :class:`ConnectionLost` when corosync is gone."""
        parts = [bytes(data)] if isinstance(data, bytes | bytearray | memoryview) else \
            [bytes(p) for p in data]
        size = sum(len(p) for p in parts)
        if size > self.max_atomic:
            raise MessageTooLarge(size, self.max_atomic)
        if not self.joined:
            raise CorosyncError("cpg_mcast_joined", CS_ERR_NOT_EXIST, "not joined to the group")
        if self.flow_control():
            self.counters["flow_control"] += 1
            raise self._pushed_back()
        iov = (_IoVec * max(1, len(parts)))()
        # c_char_p over a bytes object points at its buffer (no copy); libqb copies the message
        # into its shared-memory ring before cpg_mcast_joined returns, so nothing outlives this.
        keep = [ctypes.c_char_p(p) for p in parts]
        for i, (p, ptr) in enumerate(zip(parts, keep, strict=True)):
            iov[i].iov_base = ctypes.cast(ptr, ctypes.c_void_p)
            iov[i].iov_len = len(p)
        code = self._lib.cpg_mcast_joined(self._handle, CPG_TYPE_AGREED, iov, len(parts))
        if code == CS_ERR_TRY_AGAIN:
            self.counters["try_again"] += 1
            raise self._pushed_back()
        if code != CS_OK:
            if code in (CS_ERR_LIBRARY, CS_ERR_BAD_HANDLE):
                self.lost = True
            _check("cpg_mcast_joined", code)
        self._tries = 0
        self.counters["sent"] += 1

    def _pushed_back(self) -> WouldBlock:
        delay = min(RETRY_FIRST * (2 ** self._tries), RETRY_MAX)
        self._tries += 1
        self._retry_at = time.monotonic() + delay
        return WouldBlock("cpg_mcast_joined", delay)

    # --- the send queue (send, send_many, pending: SendQueue) ---

    def pump(self) -> bool:
        """Multicast queued messages, oldest first, until the queue is empty (True) or corosync
        pushes back (False: call again after :meth:`retry_in`). Never sleeps."""
        if self._queue and time.monotonic() < self._retry_at:
            return False
        while self._queue:
            try:
                self.mcast(self._queue[0])
            except WouldBlock:
                return False
            self._queue.popleft()
        return True

    def retry_in(self) -> float | None:
        """Seconds until :meth:`pump` is worth calling again (0 when it is now), None when the queue
        is empty: the daemon's selector timeout."""
        if not self._queue:
            return None
        return max(0.0, self._retry_at - time.monotonic())

    # --- the end ---

    def close(self) -> None:
        """Finalize the connection (corosync reports a ``LEAVE`` to the others). Idempotent; errors
        are ignored, since a lost corosync has nothing left to finalize."""
        if self.closed:
            return
        self.closed = True
        if getattr(self, "_handle", None) is not None:
            self._lib.cpg_finalize(self._handle)
        self.joined = False

    def __enter__(self) -> CpgGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- quorum -------------------------------------------------------------------------------------


class Quorum:
    """The quorum service: :attr:`quorate` as last known, its changes from :meth:`dispatch`.

    ``provider`` is False when corosync runs without a quorum provider (``quorum_type`` is
    ``QUORUM_FREE``): then every partition calls itself quorate, which a cluster log must refuse.
    """

    def __init__(self, track: bool = True) -> None:
        self._lib = load("quorum")
        self._events: list[QuorumChange] = []
        self.closed = False
        self.lost = False
        self._callbacks = _QuorumCallbacks(_QUORUM_FN(self._on_notify))
        handle = ctypes.c_uint64()
        qtype = ctypes.c_uint32()
        code = self._lib.quorum_initialize(ctypes.byref(handle), ctypes.byref(self._callbacks),
                                           ctypes.byref(qtype))
        if code != CS_OK:
            raise _connect_error("quorum_initialize", code, "quorum")
        self._handle = handle.value
        self.provider = qtype.value == QUORUM_SET
        try:
            fd = ctypes.c_int()
            _check("quorum_fd_get", self._lib.quorum_fd_get(self._handle, ctypes.byref(fd)))
            self._fd = fd.value
            self.quorate = self.getquorate()
            self.members: tuple[int, ...] = ()
            self.ring_seq = 0
            if track:
                _check("quorum_trackstart",
                       self._lib.quorum_trackstart(self._handle, CS_TRACK_CHANGES | CS_TRACK_CURRENT))
        except BaseException:
            self.close()
            raise

    def _on_notify(self, _handle: int, quorate: int, ring_seq: int, n: int, members: Any) -> None:
        self._events.append(QuorumChange(bool(quorate), ring_seq, tuple(members[i] for i in range(n))))

    def fileno(self) -> int:
        return self._fd

    def getquorate(self) -> bool:
        """Ask corosync now (one IPC round trip to the local corosync)."""
        value = ctypes.c_int()
        _check("quorum_getquorate", self._lib.quorum_getquorate(self._handle, ctypes.byref(value)))
        return bool(value.value)

    def dispatch(self) -> list[QuorumChange]:
        """The quorum changes corosync has for us now (never blocks); updates :attr:`quorate`.
        When corosync is gone: :class:`ConnectionLost` (with the ``events`` before it), and
        :attr:`quorate` is False from then on."""
        if self.closed:
            raise ConnectionLost("quorum_dispatch", CS_ERR_BAD_HANDLE, "the handle is closed")
        code = self._lib.quorum_dispatch(self._handle, CS_DISPATCH_ALL)
        events, self._events = self._events, []
        for event in events:
            self.quorate, self.ring_seq, self.members = event.quorate, event.ring_seq, event.members
        if code != CS_OK:
            self.lost = True
            self.quorate = False
            _check("quorum_dispatch", code, events)
        return events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if getattr(self, "_handle", None) is not None:
            self._lib.quorum_finalize(self._handle)

    def __enter__(self) -> Quorum:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- large payloads in pieces -------------------------------------------------------------------

#: A piece's header: magic, version, transfer id, piece index, piece count, payload length, the
#: payload's CRC-32 (in every piece, so a piece from a different payload is recognised).
PIECE = struct.Struct("<2sBxQIIQI")
PIECE_MAGIC = b"UP"
PIECE_VERSION = 1


class PieceError(ValueError):
    """A piece that does not continue the transfer it claims to belong to."""


def split(payload: bytes | memoryview, transfer: int, limit: int) -> list[bytes]:
    """``payload`` as pieces of at most ``limit`` bytes each (header included), to be multicast
    in this order by one sender. CPG delivers one sender's messages in the order it sent them,
    so the pieces arrive in order, interleaved only with other senders' messages; the payload
    takes effect where its last piece falls in the agreed order."""
    room = limit - PIECE.size
    if room <= 0:
        raise ValueError(f"a piece limit of {limit} bytes leaves no room for data")
    view = memoryview(payload)
    count = max(1, -(-len(view) // room))
    crc = zlib.crc32(view)
    return [PIECE.pack(PIECE_MAGIC, PIECE_VERSION, transfer, i, count, len(view), crc)
            + bytes(view[i * room:(i + 1) * room]) for i in range(count)]


class Reassembler:
    """Puts :func:`split`'s pieces back together, one transfer per sender (nodeid, pid) at a time.

    :meth:`feed` returns the payload when its last piece arrives, None before. A piece that does
    not follow its predecessor raises :class:`PieceError` (and drops the transfer); a first piece
    replaces whatever the sender had half sent. :meth:`forget` drops a departed sender's half.
    """

    def __init__(self, max_payload: int = 1 << 30) -> None:
        self.max_payload = max_payload
        self._partial: dict[tuple[int, int], tuple[int, int, int, int, bytearray]] = {}

    def feed(self, nodeid: int, pid: int, piece: bytes) -> bytes | None:
        if len(piece) < PIECE.size:
            raise PieceError(f"a piece of {len(piece)} bytes is shorter than its header")
        magic, version, transfer, index, count, total, crc = PIECE.unpack_from(piece)
        if magic != PIECE_MAGIC or version != PIECE_VERSION:
            raise PieceError(f"not a piece (magic {magic!r}, version {version})")
        if total > self.max_payload or count == 0 or index >= count:
            raise PieceError(f"piece {index}/{count} of {total} bytes refused")
        key = (nodeid, pid)
        data = piece[PIECE.size:]
        if index == 0:
            buf = bytearray()
            self._partial.pop(key, None)
        else:
            state = self._partial.pop(key, None)
            if state is None:
                raise PieceError(f"piece {index}/{count} of transfer {transfer} from {key} "
                                 "without its predecessors")
            t, n, c, expected, buf = state
            if (t, n, c) != (transfer, count, crc) or expected != index:
                raise PieceError(f"piece {index}/{count} of transfer {transfer} from {key}: "
                                 f"expected piece {expected} of transfer {t}")
        buf += data
        if index + 1 < count:
            self._partial[key] = (transfer, count, crc, index + 1, buf)
            return None
        if len(buf) != total or zlib.crc32(buf) != crc:
            raise PieceError(f"transfer {transfer} from {key}: {len(buf)} bytes reassembled, "
                             f"{total} announced, or its CRC differs")
        return bytes(buf)

    def forget(self, nodeid: int, pid: int) -> None:
        self._partial.pop((nodeid, pid), None)

    @property
    def in_progress(self) -> int:
        return len(self._partial)
