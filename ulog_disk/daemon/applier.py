"""The applier: performs the engine's effects against a backend, in order, and keeps the books
of durability.

The engine (:mod:`ulog_disk.log.engine`) decides and returns effects as data; this module is where
they become I/O. For each step it appends the step's journal records (on the calling thread:
a ``pwrite`` into the page cache, no disk wait), and turns its store effects into one job for the
daemon's store worker. It also keeps what only the I/O side can know: the journal position of
each instance's oldest change that its store does not hold yet (which decides when a checkpoint
is due, and how far the journal may be cut), and the positions store writes under way carry.

What a request leads to, for the daemon: a :class:`~ulog_disk.protocol.wire.Reply` to send now, or a
:class:`Waiting` — the reply waits for the journal to be durable up to ``durable_at`` (the
group-commit thread's sync), or for ``job`` (the store worker). Whoever sees the work succeed
sends ``reply`` if there is one (:func:`answered_early`); the loop then reports the outcome with
:meth:`Applier.completed`, which returns the reply still to send, if any. One rule, one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..log.engine import (
    JOURNAL_EFFECTS,
    Admission,
    AppendFlush,
    AppendOps,
    Engine,
    Instance,
    Key,
    Stats,
    Step,
    StoreCommit,
    StoreDrop,
    StoreEffect,
    StoreRecord,
    describe,
    effect_key,
)
from ..protocol.requests import Answered
from ..protocol.wire import Reply, Request
from ..storage.base import Backend, BackendError, Commit

log = logging.getLogger("ulog_disk.applier")


@dataclass(slots=True)
class _Book:
    """What a store effect under way owes the durability books when its job ends."""

    effect: StoreEffect
    #: The journal position the write reaches.
    position: int
    #: The position of the instance's oldest change this write carries (None: none unstored).
    first: int | None = None
    #: Its entry in :attr:`Applier.storing`.
    token: int = 0


@dataclass(slots=True)
class Waiting:
    """A reply that waits: for the journal to be durable up to ``durable_at``, or for ``job``
    (the step's store writes) to run on the store worker."""

    #: The engine's token for :meth:`Engine.completed`.
    work: int
    #: What a success answers, sent by the thread that sees it (None: the loop answers).
    reply: Reply | None
    durable_at: int | None = None
    job: Callable[[], None] | None = None
    books: list[_Book] = field(default_factory=list)


def answered_early(reply: Reply | None, exc: BaseException | None) -> bool:
    """The one rule of who answers a waiting request: the thread that ran its work (store
    worker, group-commit thread) sends the waiting's ``reply`` on success, when there is one;
    in every other case the loop sends what :meth:`Applier.completed` returns."""
    return exc is None and reply is not None


class Applier:
    """The engine and its backend: requests in, replies and waits out."""

    def __init__(self, engine: Engine, backend: Backend,
                 wall_clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.backend = backend
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        #: Per instance with changes not in its store: the journal position of the first of
        #: them, and when (monotonic) it was made; oldest first.
        self.unstored: dict[Key, tuple[int, float]] = {}
        #: Store writes under way: the position of the oldest change each carries, by book.
        self.storing: dict[int, int] = {}
        self._books = 0
        #: The journal position this start's restore began appending at (0: no restore).
        self.started_at = 0

    @classmethod
    def over(cls, backend: Backend, boot_id: str, admission: Admission | None = None) -> Applier:
        """A new engine for the backend (journaled as the backend is)."""
        return cls(Engine(boot_id, journaled=backend.journaled, admission=admission), backend)

    @property
    def table(self) -> dict[Key, Instance]:
        """The engine's table, for readers (metrics, tools, tests)."""
        return self.engine.table

    @property
    def stats(self) -> Stats:
        return self.engine.stats

    # --- start-up ------------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the engine's table from the backend (daemon restart)."""
        restored = self.backend.restore(self.engine.boot_id)
        self.engine.load(restored)
        self.started_at = self.backend.position()
        now = self.monotonic()
        for stored in restored.instances:
            key = (stored.record.uuid, stored.record.luid)
            if stored.replayed_from is not None and key in self.engine.table:
                # What was replayed is in the journal only: the next checkpoints write it.
                self.unstored[key] = (stored.replayed_from, now)

    # --- requests ------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply | Waiting:
        result = self.engine.step(req, self.wall_clock())
        if isinstance(result, Reply):
            return result
        return self.perform(result)

    def handle_now(self, req: Request) -> Reply:
        """Handle and run any backend work inline (tests, tools)."""
        result = self.handle(req)
        if isinstance(result, Reply):
            return result
        reply = self.complete_now(result)
        assert reply is not None, "a request's work answered nothing"
        return reply

    def complete_now(self, waiting: Waiting) -> Reply | None:
        """Run what ``waiting`` waits for on this thread and complete it: its reply, if any."""
        try:
            if waiting.job is not None:
                waiting.job()
            else:
                self.backend.sync()
        except BaseException as exc:  # noqa: BLE001 - completed() decides what it means
            return self.completed(waiting, exc)
        reply = self.completed(waiting, None)
        return waiting.reply if reply is None else reply

    def perform(self, step: Step) -> Reply | Waiting:
        """Perform the step's journal appends now, in order; its store effects become the
        job a :class:`Waiting` carries."""
        backend = self.backend
        stores: list[StoreEffect] = []
        #: The position after the step's last record: what its reply waits for, if it waits.
        ticket = backend.position()
        reply = step.reply
        for effect in step.effects:
            if isinstance(effect, JOURNAL_EFFECTS):
                # Appended or not, the instance has changes its store does not hold from here on.
                self._unstored_since(effect_key(effect), ticket)
                try:
                    if isinstance(effect, AppendOps):
                        ticket = backend.log_ops(effect.uuid, effect.luid, effect.ops)
                    elif isinstance(effect, AppendFlush):
                        ticket = backend.log_flush(effect.record, effect.ops)
                    else:
                        ticket = backend.log_event(effect.record, effect.event)
                except BackendError as exc:
                    self.engine.append_failed(effect, exc, step.work)
                    if step.wait is Answered.DURABLE:
                        return self.perform(self.engine.flush_fallback(step.work))
                    if step.wait is not Answered.AT_ONCE:
                        reply = None  # answered by the loop, once the engine's books are right
                    ticket = backend.position()
            else:
                stores.append(effect)
        if step.wait is Answered.AT_ONCE:
            assert reply is not None and not stores
            return reply
        if step.wait is Answered.DURABLE:
            if type(ticket) is not int:
                # A backend that returned no ticket (a plugin's missing return): the position
                # after the record is what the reply must wait for, never "nothing".
                ticket = backend.position()
            return Waiting(step.work, reply, durable_at=ticket)
        books = [self._book(effect) for effect in stores]
        return Waiting(step.work, reply, job=self._job(books), books=books)

    def completed(self, waiting: Waiting, exc: BaseException | None) -> Reply | None:
        """The work ``waiting`` waited for ended (on the engine's thread): settle the books and
        let the engine hear of it. Returns the reply still to send, if any."""
        for book in waiting.books:
            self.storing.pop(book.token, None)
            key = effect_key(book.effect)
            if exc is None:
                continue
            if isinstance(book.effect, StoreRecord):
                self._unstored_since(key, book.position)
            elif isinstance(book.effect, StoreCommit) and book.first is not None and key in self.engine.table:
                self._unstored_since(key, book.first)
        reply = self.engine.completed(waiting.work, exc)
        return None if answered_early(waiting.reply, exc) else reply

    # --- the store job -----------------------------------------------------------------------

    def _book(self, effect: StoreEffect) -> _Book:
        position = self.backend.position()
        # The write carries the instance's unstored changes from here on (a CTR's record is its
        # whole state).
        found = self.unstored.pop(effect_key(effect), None)
        self._books += 1
        book = _Book(effect, position, None if found is None else found[0], self._books)
        if book.first is not None and not isinstance(effect, StoreRecord):
            self.storing[book.token] = book.first
        return book

    def _job(self, books: Sequence[_Book]) -> Callable[[], None]:
        backend = self.backend

        def job() -> None:
            for book in books:
                effect = book.effect
                try:
                    if isinstance(effect, StoreRecord):
                        backend.record(effect.record, book.position, effect.retain)
                    elif isinstance(effect, StoreCommit):
                        backend.commit(Commit(effect.record, effect.clean_chunks, effect.sync_chunks,
                                              resized=effect.resized, position=book.position))
                    else:
                        backend.drop(effect.uuid, effect.luid, effect.retain, book.position)
                        if effect.release:
                            backend.release(effect.uuid)
                except BackendError as exc:
                    if not (isinstance(effect, StoreDrop) and effect.best_effort):
                        raise
                    # The commit before it succeeded; the leftover is harmless.
                    log.warning("%s not removed from the store (%s); left for ulog-recover purge",
                                describe(effect.uuid, effect.luid), exc)

        return job

    # --- background work -----------------------------------------------------------------

    def _unstored_since(self, key: Key, position: int) -> None:
        found = self.unstored.get(key)
        if found is None or position < found[0]:
            self.unstored[key] = (position, found[1] if found else self.monotonic())

    def checkpoint(self, key: Key) -> Waiting | None:
        """Background work: write one instance's changes to its store (None if it is gone)."""
        step = self.engine.checkpoint(key, self.wall_clock())
        if step is None:
            self.unstored.pop(key, None)
            return None
        result = self.perform(step)
        assert isinstance(result, Waiting)
        return result

    def checkpoint_due(self, now: float, age: float, span: int, idle: bool) -> Key | None:
        """The instance to checkpoint next, if any is due: its changes are older than ``age``
        seconds, or the journal this start wrote since them is longer than ``span`` bytes, or the
        daemon is idle.

        The span counts from the start's first position at most: what the restore replayed lies
        in segments an earlier run wrote, which the new segment follows. Counted from there,
        every replayed instance would be due the moment the daemon is ready, and a thousand
        mirrors reconnecting would find the store worker writing a thousand checkpoints (an
        environment opened and two syncs each) that compete with their group commits for the
        disk and the CPU. The replay is durable in the journal: those checkpoints wait for an
        idle moment or ``age``, as any young change does."""
        if not self.unstored:
            return None
        key, (first, since) = next(iter(self.unstored.items()))
        if idle or now - since >= age or self.backend.position() - max(first, self.started_at) >= span:
            return key
        return None

    def needed(self) -> int:
        """Every journal record below this position is in the stores."""
        oldest = self.backend.position()
        for first, _ in self.unstored.values():
            oldest = min(oldest, first)
        for first in self.storing.values():
            oldest = min(oldest, first)
        return oldest

    def commit_all(self) -> list[Waiting]:
        """Work that writes every instance to its store (clean stop): the journal is then not
        needed by anything."""
        out = []
        for step in self.engine.commit_all(self.wall_clock()):
            result = self.perform(step)
            assert isinstance(result, Waiting)
            out.append(result)
        return out


__all__ = ["Applier", "Waiting", "answered_early"]
