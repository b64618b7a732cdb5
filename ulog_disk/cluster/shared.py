"""The state every node of a cluster holds for its clustered logs, and the one function that
changes it: :meth:`ClusterState.apply`, given the agreed stream. No I/O, no clock.

Every node applies the same inputs in corosync's agreed order and so holds the same state; that
is the whole replication. The rules, for one log (a uuid), derived from what the kernel needs of
a cluster log (``docs/cluster.md``, "What is guaranteed"):

* **Marks are per node** (:attr:`SharedLog.marks`, keyed by corosync node id). A region is clean
  (``IS_CLEAN`` 1) only while no node holds it marked and no departed node's marks on it are
  unresolved; a CLEAR removes the clearing node's mark only.
* **One recoverer per region.** ``GET_RESYNC_WORK`` hands a node the lowest region, from that
  node's cursor, that is out of sync, handed to nobody, not marked by another node and not held
  for a fence (first the regions it names as preferred: those its kernel's writes wait for); it
  hands the *same* region again until ``SET_REGION_SYNC`` reports on it (the kernel's resend
  after 15 s must not skip a region).
* **No write to a region out of sync** but by its recoverer (``IS_REMOTE_RECOVERING`` 1 for every
  other node, cmirrord's policy): a node writing it NOSYNC (the default leg only, unmarked) while
  another copies the legs would leave them different under a region reported in sync.
* **A departed node** (left the membership, or found missing when the cluster formed again):
  every region it held marked or was recovering becomes out of sync at once and is *held*
  (:attr:`SharedLog.held`: ``IS_REMOTE_RECOVERING`` 1, handed to nobody) until the node is
  fenced (a :class:`Fenced` input); then those regions are *released* for recovery
  (:attr:`SharedLog.released`, still ``IS_REMOTE_RECOVERING`` 1 for any node but the one
  recovering them) until a ``SET_REGION_SYNC`` puts each back in sync.
* **A node's own restart.** A node opening a log (its RESUME) with another luid or another boot
  than it last did had every write it had in flight end (a table reload suspends the old one; a
  reboot ends all): its old marks become out of sync, released at once. The same luid and boot is
  the kernel reconnecting to a restarted daemon: its writes may still be in flight, its marks
  stay.
* **Epoch.** Every input that changes state counts one, while the node is quorate: the epoch is
  how far along the one agreed history a state is. The node with the highest epoch is the donor
  when members exchange state (ties: the lowest node id); a flushed mark is in every state whose
  epoch is at or past the FLUSH's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from bitarray import bitarray

from ..log.regionlog import new_bitmap, resize


class ClusterRuleError(ValueError):
    """An input this state cannot take (a region past the log's end, a log it does not know).
    Deterministic: every node refuses the same input the same way."""


@dataclass(frozen=True, slots=True)
class NodeOpen:
    """Where a node last opened a log: which luid, on which boot of its host."""

    luid: int
    boot_id: str


@dataclass
class SharedLog:
    uuid: str
    region_count: int
    sync: bitarray
    sync_count: int
    #: node id → the regions it holds marked (flushed MARKs not yet CLEARed).
    marks: dict[int, bitarray] = field(default_factory=dict)
    #: node id → regions of that departed node waiting for it to be fenced.
    held: dict[int, bitarray] = field(default_factory=dict)
    #: Regions of departed (and fenced) nodes not yet back in sync.
    released: bitarray = field(default_factory=bitarray)
    #: region → the node recovering it.
    recovering: dict[int, int] = field(default_factory=dict)
    #: node id → where its next search for resync work starts (0 at its RESUME).
    cursor: dict[int, int] = field(default_factory=dict)
    #: node id → where it has the log open (resumed, not yet closed).
    opened: dict[int, NodeOpen] = field(default_factory=dict)

    @classmethod
    def fresh(cls, uuid: str, region_count: int, in_sync: bool) -> SharedLog:
        sync = new_bitmap(region_count, in_sync)
        return cls(uuid, region_count, sync, region_count if in_sync else 0,
                   released=new_bitmap(region_count, False))

    # --- reads (answered by each node from its own copy) --------------------------------------

    def check_region(self, region: int) -> None:
        if not 0 <= region < self.region_count:
            raise ClusterRuleError(f"region {region} out of range (region count {self.region_count})")

    def is_clean(self, region: int) -> bool:
        self.check_region(region)
        if self.released[region]:
            return False
        return not any(bits[region] for bits in self.marks.values()) and \
            not any(bits[region] for bits in self.held.values())

    def in_sync(self, region: int) -> bool:
        self.check_region(region)
        return bool(self.sync[region])

    def first_unsynced(self) -> int:
        if self.sync_count == self.region_count:
            return self.region_count
        r = self.sync.find(0, 0, self.region_count)
        return self.region_count if r < 0 else r

    def remote_recovering(self, node: int, region: int) -> bool:
        """Whether ``node`` must hold its writes to ``region``: it is out of sync and ``node`` is
        not recovering it (another node may be, or may be handed it the next moment: a write
        that went to the default leg alone meanwhile would race the copy). Held and released
        regions of departed nodes are out of sync."""
        self.check_region(region)
        owner = self.recovering.get(region)
        if owner is not None:
            return owner != node
        return not self.sync[region]

    def marked_by(self, node: int) -> list[int]:
        bits = self.marks.get(node)
        return [] if bits is None else list(bits.search(1))

    def held_regions(self) -> list[int]:
        out: set[int] = set()
        for bits in self.held.values():
            out.update(bits.search(1))
        return sorted(out)

    # --- changes ---------------------------------------------------------------------------

    def _bits(self, table: dict[int, bitarray], node: int) -> bitarray:
        bits = table.get(node)
        if bits is None:
            bits = table[node] = new_bitmap(self.region_count, False)
        return bits

    def flush(self, node: int, marks: Iterable[int], clears: Iterable[int]) -> None:
        marks, clears = list(marks), list(clears)
        for r in marks + clears:
            self.check_region(r)
        if clears and node in self.marks:
            bits = self.marks[node]
            for r in clears:
                bits[r] = 0
        if marks:
            bits = self._bits(self.marks, node)
            for r in marks:
                bits[r] = 1
        if node in self.marks and not self.marks[node].any():
            del self.marks[node]

    def _set_sync(self, region: int, in_sync: bool) -> None:
        if in_sync and not self.sync[region]:
            self.sync[region] = 1
            self.sync_count += 1
        elif not in_sync and self.sync[region]:
            self.sync[region] = 0
            self.sync_count -= 1

    def resync_work(self, node: int, prefer: Iterable[int] = (), limit: int | None = None) -> int | None:
        """The region ``node`` recovers next, or None. ``limit``: the node's own table's region
        count (another node's reload may have resized the log past or short of it): nothing at or
        past it is handed out, and a region it was handed there is given back."""
        limit = self.region_count if limit is None else min(limit, self.region_count)
        for region, owner in list(self.recovering.items()):
            if owner == node:
                if region < limit:
                    return region
                del self.recovering[region]
        if node not in self.opened:
            return None
        start = min(self.cursor.get(node, 0), limit)
        blocked = new_bitmap(self.region_count, False)
        for other, bits in self.marks.items():
            if other != node:
                blocked |= bits
        for bits in self.held.values():
            blocked |= bits
        candidates = ~self.sync & ~blocked
        candidates[limit:] = 0
        # The regions the node's writes wait for first (IS_REMOTE_RECOVERING said 1): a write
        # waits for one region's recovery, not for the sweep to get there.
        for region in prefer:
            if 0 <= region < limit and candidates[region] and region not in self.recovering:
                self.recovering[region] = node
                return region
        # From the cursor to the end, then from the start: unlike one node's log, regions come
        # back to hand out while the search is past them (another node's recovery failed, a
        # departed node was fenced), and the kernel keeps asking.
        for lo, hi in ((start, limit), (0, start)):
            for region in candidates.search(1, lo, hi):
                if region not in self.recovering:
                    self.cursor[node] = region + 1
                    self.recovering[region] = node
                    return region
        self.cursor[node] = 0
        return None

    def set_region_sync(self, node: int, region: int, in_sync: bool) -> None:
        self.check_region(region)
        if self.recovering.get(region) == node:
            del self.recovering[region]
        if in_sync and any(bits[region] for bits in self.held.values()):
            # A departed node not fenced yet may still be writing it (a late report of a
            # recovery that started before the departure): it stays out of sync.
            return
        if in_sync and self.recovering.get(region, node) != node:
            return  # another node recovers it: its report counts, not this one
        self._set_sync(region, in_sync)
        if in_sync:
            self.released[region] = 0

    def _unsync(self, bits: bitarray) -> None:
        for region in bits.search(1):
            self._set_sync(region, False)

    def depart(self, node: int) -> int:
        """``node`` is gone without closing: its marks and recoveries out of sync and held for
        its fence. Returns how many regions it held."""
        self.opened.pop(node, None)
        self.cursor.pop(node, None)
        hold = self.marks.pop(node, None)
        if hold is None:
            hold = new_bitmap(self.region_count, False)
        for region in [r for r, owner in self.recovering.items() if owner == node]:
            del self.recovering[region]
            hold[region] = 1
        if not hold.any():
            return 0
        # A region it held that another node had started to recover (a hand-out ordered before
        # the departure): held like the rest; handed out again once the node is fenced.
        for region in [r for r in self.recovering if hold[r]]:
            del self.recovering[region]
        self._unsync(hold)
        previous = self.held.get(node)
        self.held[node] = hold if previous is None else previous | hold
        return hold.count(1)

    def fenced(self, node: int) -> int:
        hold = self.held.pop(node, None)
        if hold is None:
            return 0
        self.released |= hold
        return hold.count(1)

    def release_marks(self, node: int) -> int:
        """``node``'s writes have ended (its suspend, a reload, its reboot): its marks out of
        sync, for anyone to recover."""
        bits = self.marks.pop(node, None)
        for region in [r for r, owner in self.recovering.items() if owner == node]:
            del self.recovering[region]
        if bits is None:
            return 0
        self._unsync(bits)
        self.released |= bits
        return bits.count(1)

    def open(self, node: int, luid: int, boot_id: str, region_count: int, new_in_sync: bool) -> int:
        """``node`` resumes the log. Returns how many of its marks were released."""
        if region_count != self.region_count:
            self.resize(region_count, new_in_sync)
        before = self.opened.get(node)
        released = 0
        if before != NodeOpen(luid, boot_id):
            released = self.release_marks(node)
        self.opened[node] = NodeOpen(luid, boot_id)
        self.cursor[node] = 0
        return released

    def close(self, node: int) -> int:
        self.opened.pop(node, None)
        self.cursor.pop(node, None)
        return self.release_marks(node)

    def resize(self, region_count: int, new_in_sync: bool) -> None:
        old = self.region_count
        tables = [self.sync, self.released, *self.marks.values(), *self.held.values()]
        for bits in tables:
            resize(bits, region_count)
        if region_count > old and new_in_sync:
            self.sync[old:region_count] = 1
        self.region_count = region_count
        self.sync_count = self.sync.count(1)
        self.recovering = {r: n for r, n in self.recovering.items() if r < region_count}

    def check(self) -> list[str]:
        problems = []
        if self.sync_count != self.sync.count(1):
            problems.append(f"{self.uuid}: sync_count {self.sync_count} != {self.sync.count(1)}")
        for region, node in self.recovering.items():
            if self.sync[region]:
                problems.append(f"{self.uuid}: region {region} recovered by node {node} is in sync")
        for node, bits in self.held.items():
            for region in bits.search(1):
                if self.sync[region]:
                    problems.append(f"{self.uuid}: region {region} held for node {node}'s fence is in sync")
        return problems


# --- inputs: what the agreed stream carries, as values ----------------------------------------

@dataclass(frozen=True, slots=True)
class Flush:
    node: int
    uuid: str
    marks: tuple[int, ...]
    clears: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ResyncWork:
    node: int
    uuid: str
    #: Regions to hand out first, if they may be (the sender's writes wait for them).
    prefer: tuple[int, ...] = ()
    #: The sender's table's region count: nothing at or past it is handed to the sender.
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class SetRegionSync:
    node: int
    uuid: str
    region: int
    in_sync: bool


@dataclass(frozen=True, slots=True)
class Open:
    node: int
    uuid: str
    luid: int
    boot_id: str
    region_count: int
    #: Whether regions the log does not have yet start in sync (the CTR's ``nosync``).
    in_sync: bool


@dataclass(frozen=True, slots=True)
class Close:
    node: int
    uuid: str
    #: The node destroyed its instance (DTR): the log is dropped when no node has it open.
    destroy: bool


@dataclass(frozen=True, slots=True)
class Departed:
    """Nodes gone from the membership (at its agreed place in the stream), or found missing
    when the cluster formed."""

    nodes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Fenced:
    node: int


@dataclass(frozen=True, slots=True)
class Rebooted:
    """A node whose host booted again since it last opened its logs (its boot id changed):
    every write it had in flight ended with that boot."""

    node: int
    boot_id: str


Input = Flush | ResyncWork | SetRegionSync | Open | Close | Departed | Fenced | Rebooted


@dataclass
class ClusterState:
    logs: dict[str, SharedLog] = field(default_factory=dict)
    #: How far along the agreed history this state is (see the module's docstring).
    epoch: int = 0
    #: Departed nodes not fenced yet, in the order they departed.
    unfenced: list[int] = field(default_factory=list)

    def apply(self, item: Input) -> object:
        """Apply one input; returns what its origin answers (a region or None for ResyncWork,
        a count for the others). Raises :class:`ClusterRuleError` for an input that cannot apply
        (every node raises it alike and changes nothing)."""
        result = self._apply(item)
        self.epoch += 1
        return result

    def _log(self, uuid: str) -> SharedLog:
        shared = self.logs.get(uuid)
        if shared is None:
            raise ClusterRuleError(f"no clustered log {uuid!r} is open in the cluster")
        return shared

    def _apply(self, item: Input) -> object:
        if isinstance(item, Flush):
            self._log(item.uuid).flush(item.node, item.marks, item.clears)
            return len(item.marks)
        if isinstance(item, ResyncWork):
            return self._log(item.uuid).resync_work(item.node, item.prefer, item.limit)
        if isinstance(item, SetRegionSync):
            self._log(item.uuid).set_region_sync(item.node, item.region, item.in_sync)
            return 1
        if isinstance(item, Open):
            shared = self.logs.get(item.uuid)
            if shared is None:
                shared = self.logs[item.uuid] = SharedLog.fresh(item.uuid, item.region_count, item.in_sync)
            return shared.open(item.node, item.luid, item.boot_id, item.region_count, item.in_sync)
        if isinstance(item, Close):
            shared = self._log(item.uuid)
            released = shared.close(item.node)
            if item.destroy and not shared.opened and not shared.held and not shared.marks \
                    and not shared.released.any():
                del self.logs[item.uuid]
            return released
        if isinstance(item, Departed):
            held = 0
            for node in item.nodes:
                for shared in self.logs.values():
                    held += shared.depart(node)
                if node not in self.unfenced:
                    self.unfenced.append(node)
            return held
        if isinstance(item, Fenced):
            if item.node in self.unfenced:
                self.unfenced.remove(item.node)
            return sum(shared.fenced(item.node) for shared in self.logs.values())
        if isinstance(item, Rebooted):
            released = 0
            for shared in self.logs.values():
                before = shared.opened.get(item.node)
                if before is not None and before.boot_id != item.boot_id:
                    shared.opened.pop(item.node)
                    shared.cursor.pop(item.node, None)
                    released += shared.release_marks(item.node)
            return released
        raise TypeError(f"not a cluster input: {item!r}")

    def nodes_known(self) -> set[int]:
        """Every node some log remembers (opened, marks, recoveries, held)."""
        out: set[int] = set()
        for shared in self.logs.values():
            out.update(shared.opened, shared.marks, shared.held, shared.recovering.values())
        return out

    def check(self) -> list[str]:
        problems = []
        for shared in self.logs.values():
            problems.extend(shared.check())
        return problems
