"""A CPG member driven over its stdin, for the rig's tests: the binding used the way the daemon
will use it (one selector loop polling the group's and the quorum's descriptors, the send queue
pumped after each turn and retried after its backoff), and a client to drive it.

Run inside a node's network namespace (``Rig.popen(node, [python, cpg_worker.py])``), the worker
reads one JSON request a line and writes one JSON line per reply (``{"re": ID, ...}``) and per
event (``{"ev": ...}``), each event with its ``t`` on the machine-wide monotonic clock, so the
test can compare times across namespaces.

Requests: ``join`` (group, with quorum tracking), ``blast`` (COUNT messages of SIZE bytes, queued
at once, reply when the last has gone to corosync), ``log`` (what was delivered: count, digest,
per-sender order), ``ping`` (COUNT sequential agreed round trips to itself, the latencies),
``big`` (a SIZE-byte payload split below the atomic size; every member reports it reassembled),
``too_big`` (a message one byte above the atomic size), ``quorum``, ``members``, ``exit``.
Events: ``confchg``, ``totem``, ``quorum``, ``big`` (a payload reassembled), ``lost`` (the
connection to corosync is gone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

KIND_BLAST = b"M"
KIND_PING = b"P"
KIND_PIECE = b"B"
BLAST = struct.Struct("<I")
PING = struct.Struct("<II")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Worker:
    def __init__(self) -> None:
        from ulog_disk.cluster import corosync

        self.cs = corosync
        self.sel = selectors.DefaultSelector()
        self.group: Any = None
        self.quorum: Any = None
        self.out = sys.stdout
        self.inbuf = b""
        self.delivered: list[tuple[int, int, int]] = []   # (nodeid, pid, seq); seq -1 = a payload
        self.digest = hashlib.sha256()
        self.next_seq: dict[tuple[int, int], int] = {}
        self.order_errors: list[str] = []
        self.members: list[tuple[int, int]] = []
        self.reassembler = corosync.Reassembler()
        self.transfer = 0
        self.blast_waiting: int | None = None            # request id waiting for the queue to drain
        self.ping: dict[str, Any] | None = None
        self.big_waiting: dict[int, tuple[int, float]] = {}   # transfer -> (request id, t0)
        self.running = True

    # --- output ---

    def emit(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def event(self, name: str, **kw: Any) -> None:
        self.emit({"ev": name, "t": time.monotonic(), **kw})

    # --- the loop ---

    def run(self) -> None:
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        while self.running:
            timeout = self.group.retry_in() if self.group is not None else None
            for key, _ in self.sel.select(timeout):
                if key.data == "stdin":
                    self.on_stdin()
                elif key.data == "cpg":
                    self.on_cpg()
                elif key.data == "quorum":
                    self.on_quorum()
            if self.group is not None and not self.group.lost:
                self.pump()

    def pump(self) -> None:
        try:
            empty = self.group.pump()
        except self.cs.ConnectionLost as e:
            self.lost(e)
            return
        if empty and self.blast_waiting is not None:
            self.emit({"re": self.blast_waiting, "ok": True, "counters": self.group.counters})
            self.blast_waiting = None

    def lost(self, error: Exception) -> None:
        for obj in (self.group, self.quorum):
            if obj is not None and not obj.closed:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(obj.fileno())
        self.group.lost = True
        self.event("lost", error=str(error))

    def on_stdin(self) -> None:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.running = False
            return
        self.inbuf += chunk
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                req = json.loads(line)
                try:
                    self.handle(req)
                except Exception as e:  # a failed request is reported, the worker lives on
                    self.emit({"re": req.get("id"), "ok": False, "error": type(e).__name__,
                               "message": str(e)})

    def dispatched(self, handle: Any) -> tuple[list[Any], Exception | None]:
        """What ``handle.dispatch()`` delivered, and the lost connection that ended it (or None):
        the events dispatched before a loss are agreed, so they are reported before it."""
        try:
            return handle.dispatch(), None
        except self.cs.ConnectionLost as e:
            return e.events, e

    def on_cpg(self) -> None:
        cs = self.cs
        events, lost = self.dispatched(self.group)
        for ev in events:
            if isinstance(ev, cs.Deliver):
                self.on_deliver(ev)
            elif isinstance(ev, cs.ConfChange):
                self.members = [a.member for a in ev.members]
                for a in ev.left:
                    self.reassembler.forget(a.nodeid, a.pid)
                self.event("confchg", members=self.members,
                           left=[[a.nodeid, a.pid, a.reason.name] for a in ev.left],
                           joined=[[a.nodeid, a.pid, a.reason.name] for a in ev.joined])
            elif isinstance(ev, cs.TotemChange):
                self.event("totem", ring=[ev.ring.nodeid, ev.ring.seq], members=list(ev.members))
        if lost is not None:
            self.lost(lost)

    def on_quorum(self) -> None:
        events, lost = self.dispatched(self.quorum)
        for ev in events:
            self.event("quorum", quorate=ev.quorate, ring_seq=ev.ring_seq, members=list(ev.members))
        if lost is not None:
            self.lost(lost)

    def record(self, nodeid: int, pid: int, seq: int) -> None:
        self.delivered.append((nodeid, pid, seq))
        self.digest.update(struct.pack("<IIi", nodeid, pid, seq))

    def on_deliver(self, ev: Any) -> None:
        kind, body = ev.data[:1], ev.data[1:]
        if kind == KIND_BLAST:
            (seq,) = BLAST.unpack_from(body)
            key = (ev.nodeid, ev.pid)
            expected = self.next_seq.get(key, 0)
            if seq != expected and len(self.order_errors) < 10:
                self.order_errors.append(f"{key}: seq {seq} after {expected - 1}")
            self.next_seq[key] = seq + 1
            self.record(ev.nodeid, ev.pid, seq)
        elif kind == KIND_PING:
            pid, seq = PING.unpack_from(body)
            p = self.ping
            if p is not None and pid == self.group.pid and ev.nodeid == self.group.nodeid \
                    and seq == p["seq"]:
                p["rtts"].append(time.perf_counter() - p["t0"])
                if len(p["rtts"]) == p["count"]:
                    rtts = p["rtts"]
                    self.emit({"re": p["id"], "ok": True, "count": len(rtts),
                               "p50_ms": percentile(rtts, 0.5) * 1e3,
                               "p99_ms": percentile(rtts, 0.99) * 1e3,
                               "max_ms": max(rtts) * 1e3})
                    self.ping = None
                else:
                    self.send_ping()
        elif kind == KIND_PIECE:
            payload = self.reassembler.feed(ev.nodeid, ev.pid, body)
            if payload is not None:
                self.record(ev.nodeid, ev.pid, -1)
                self.event("big", sender=[ev.nodeid, ev.pid], size=len(payload),
                           sha256=hashlib.sha256(payload).hexdigest(),
                           position=len(self.delivered) - 1)
                transfer = self.cs.PIECE.unpack_from(body)[2]
                if ev.nodeid == self.group.nodeid and ev.pid == self.group.pid \
                        and transfer in self.big_waiting:
                    rid, t0 = self.big_waiting.pop(transfer)
                    self.emit({"re": rid, "ok": True, "seconds": time.monotonic() - t0,
                               "counters": dict(self.group.counters)})

    def send_ping(self) -> None:
        p = self.ping
        assert p is not None
        p["seq"] += 1
        msg = KIND_PING + PING.pack(self.group.pid, p["seq"])
        msg += b"\0" * max(0, p["size"] - len(msg))
        p["t0"] = time.perf_counter()
        self.group.send(msg)
        self.group.pump()

    # --- requests ---

    def handle(self, req: dict[str, Any]) -> None:
        op, rid = req["op"], req.get("id")
        cs = self.cs
        if op == "join":
            self.group = cs.CpgGroup(req.get("group", "ulog-test"))
            self.quorum = cs.Quorum()
            self.sel.register(self.group.fileno(), selectors.EVENT_READ, "cpg")
            self.sel.register(self.quorum.fileno(), selectors.EVENT_READ, "quorum")
            self.emit({"re": rid, "ok": True, "nodeid": self.group.nodeid, "pid": self.group.pid,
                       "max_atomic": self.group.max_atomic, "quorate": self.quorum.quorate,
                       "provider": self.quorum.provider})
        elif op == "blast":
            count, size = req["count"], req.get("size", 64)
            pad = b"\0" * max(0, size - 1 - BLAST.size)
            base = self.next_blast = getattr(self, "next_blast", 0)
            for i in range(count):
                self.group.send(KIND_BLAST + BLAST.pack(base + i) + pad)
            self.next_blast = base + count
            self.blast_waiting = rid
            self.pump()
        elif op == "log":
            self.emit({"re": rid, "ok": True, "count": len(self.delivered),
                       "digest": self.digest.hexdigest(), "order_errors": self.order_errors,
                       "senders": {f"{k[0]}:{k[1]}": v for k, v in self.next_seq.items()},
                       "entries": self.delivered if req.get("entries") else None})
        elif op == "ping":
            self.ping = {"id": rid, "count": req["count"], "size": req.get("size", 256), "seq": 0,
                         "rtts": [], "t0": 0.0}
            self.send_ping()
        elif op == "big":
            size = req["size"]
            payload = random.Random(req.get("seed", 1)).randbytes(size)
            self.transfer += 1
            # The pieces carry one kind byte before the piece header: a piece is limit - 1 long.
            pieces = cs.split(payload, self.transfer, self.group.max_atomic - 1)
            self.big_waiting[self.transfer] = (rid, time.monotonic())
            self.group.send_many(KIND_PIECE + p for p in pieces)
            self.pump()
            self.event("big_sent", transfer=self.transfer, pieces=len(pieces),
                       sha256=hashlib.sha256(payload).hexdigest())
        elif op == "too_big":
            results = []
            for how in ("mcast", "send"):
                try:
                    getattr(self.group, how)(b"x" * (self.group.max_atomic + 1))
                    results.append({"how": how, "refused": False})
                except cs.MessageTooLarge as e:
                    results.append({"how": how, "refused": True, "error": type(e).__name__,
                                    "name": e.name, "message": str(e)})
            self.emit({"re": rid, "ok": True, "max_atomic": self.group.max_atomic,
                       "results": results})
        elif op == "quorum":
            self.emit({"re": rid, "ok": True, "quorate": self.quorum.getquorate(),
                       "last": self.quorum.quorate})
        elif op == "members":
            self.emit({"re": rid, "ok": True, "members": self.members})
        elif op == "tune":
            # The send queue's backoff, for measuring it (module globals of the binding).
            for key in ("RETRY_FIRST", "RETRY_MAX"):
                if key in req:
                    setattr(cs, key, float(req[key]))
            self.emit({"re": rid, "ok": True})
        elif op == "exit":
            self.emit({"re": rid, "ok": True})
            self.running = False
        else:
            raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        for obj in (self.group, self.quorum):
            if obj is not None:
                obj.close()


# --- the driving side ----------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class WorkerClient:
    """A worker process and its output: replies matched by id, events kept in order."""

    def __init__(self, argv: Sequence[str], name: str, popen: Callable[..., subprocess.Popen[bytes]]
                 = subprocess.Popen) -> None:
        self.name = name
        self.proc = popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        self._ids = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.stderr: list[str] = []
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            obj = json.loads(line)
            with self._cond:
                if "re" in obj:
                    self._replies[obj["re"]] = obj
                else:
                    self.events.append(obj)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    def submit(self, op: str, **kw: Any) -> int:
        self._ids += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, "id": self._ids, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        return self._ids

    def result(self, rid: int, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise WorkerError(f"{self.name}: no reply to request {rid} "
                                      f"({'exited' if self._closed else f'{timeout:g} s'}); "
                                      f"stderr: {' | '.join(self.stderr[-5:])}")
                self._cond.wait(left)
            reply = self._replies.pop(rid)
        if not reply.get("ok"):
            raise WorkerError(f"{self.name}: {reply.get('error')}: {reply.get('message')}")
        return reply

    def call(self, op: str, timeout: float = 20.0, **kw: Any) -> dict[str, Any]:
        return self.result(self.submit(op, **kw), timeout)

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                   since: int = 0, what: str = "event") -> dict[str, Any]:
        """The first event at index >= ``since`` matching ``pred``; raises WorkerError at the
        deadline."""
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    recent = [e for e in self.events[since:] if e["ev"] != "big_sent"][-6:]
                    raise WorkerError(f"{self.name}: no {what} within {timeout:g} s; "
                                      f"events since: {recent}")
                self._cond.wait(left)

    def mark(self) -> int:
        """An index into :attr:`events`: wait_event(since=mark) sees only what comes after."""
        with self._cond:
            return len(self.events)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def worker_argv(python: str = sys.executable) -> list[str]:
    return [python, str(Path(__file__).resolve())]


def main() -> None:
    worker = Worker()
    try:
        worker.run()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
