"""ulog-recover: judge, check, clean up, resync, back up, export and import the daemon's store."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
from bitarray import bitarray

from .. import __version__
from ..daemon.cli import ToolParser, fill, tool_parser
from ..daemon.statedir import StateDirLock
from ..daemon.statedir import prepare as prepare_state_dir
from ..log import regionlog
from ..log.lifecycle import replaces_retained
from ..log.records import StoredState
from ..storage import disklog
from ..storage import journal as jn
from ..storage.base import Commit
from ..storage.lmdb_env import DIR_MODE, FILE_MODE, open_readonly
from ..storage.lmdb_store import LmdbBackend
from ..storage.store_format import StoreFormatError, split_chunks
from . import clusterview as cv
from . import storeview as sv
from .common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    Refused,
    ToolError,
    add_region_count_option,
    add_store_options,
    bit_ranges,
    check_state_dir,
    confirm,
    current_boot_id,
    daemon_status,
    emit_json,
    json_doc,
    luid_hex,
    parse_luid,
    parse_ranges,
    ranges,
    run_tool,
    state_dir_of,
    table,
    when,
)

TOOL = "ulog-recover"
#: source_luid of a retained state written by ``import`` (no kernel instance has luid 0).
IMPORTED_LUID = 0


def _state_dir(args: argparse.Namespace, fresh_ok: bool = False) -> Path:
    """The state directory of the command line, checked to be one (exit 2 if not)."""
    args.state_dir = state_dir_of(args)
    check_state_dir(args.state_dir, fresh_ok)
    return args.state_dir


def _read(args: argparse.Namespace, uuids: list[str] | None = None) -> sv.StoreView:
    _state_dir(args)
    boot_id = current_boot_id(args.boot_id)
    view = sv.read_store(args.state_dir, boot_id, uuids=uuids)
    if not view.exists:
        raise ToolError(f"{args.state_dir}: no such state directory")
    return view


def _env_or_fail(view: sv.StoreView, uuid: str, allow_missing: bool = False) -> sv.EnvView | None:
    ev = view.env(uuid)
    if ev is None and not allow_missing:
        raise ToolError(f"no store for uuid {uuid!r} in {view.state_dir}")
    return ev


def _short_boot(boot: str | None, current: str) -> str:
    if boot is None:
        return "-"
    return "this boot" if boot == current else (boot[:8] if len(boot) > 8 else boot)


# --- list ----------------------------------------------------------------------------------------


def _entry_json(ev: sv.EnvView, s: sv.StateView | None) -> dict[str, Any]:
    if s is None:
        return {"uuid": ev.uuid, "dir": ev.name, "kind": ev.kind, "luid": None, "luid_hex": None,
                "verdict": "damaged", "reason": ev.damage_reason(), "state": None, "generation": None,
                "boot_id": None, "region_count": None, "in_sync": None, "dirty": None, "committed_at": None}
    return {"uuid": ev.uuid, "dir": ev.name, "kind": s.kind, "luid": s.luid,
            "luid_hex": None if s.luid is None else luid_hex(s.luid), "verdict": s.verdict,
            "reason": s.reason,
            "state": s.state, "generation": s.generation, "boot_id": s.boot_id,
            "region_count": s.region_count or None, "in_sync": s.in_sync(), "dirty": s.dirty(),
            "committed_at": s.committed_at or None}


def _cluster(state_dir: Path) -> cv.ClusterView | None:
    """The state directory's cluster state (``dm-ulogd --cluster``), None if it has none."""
    directory = cv.cluster_dir(state_dir)
    return None if directory is None else cv.read_cluster(directory)


def _cluster_unreadable(cluster: cv.ClusterView | None) -> None:
    """After the output: a cluster state that cannot be read fails the command (exit 2)."""
    if cluster is not None and cluster.error is not None:
        raise ToolError(f"the cluster state cannot be read: {cluster.error}")


def cmd_list(args: argparse.Namespace) -> int:
    view = _read(args, args.uuid or None)
    cluster = _cluster(args.state_dir)
    entries: list[tuple[sv.EnvView, sv.StateView | None]] = []
    for ev in view.envs:
        states = [s for s in ev.states if args.luid is None or s.luid == args.luid]
        if not ev.states and ev.damaged and args.luid is None:
            entries.append((ev, None))
        entries.extend((ev, s) for s in states)
    if args.json:
        emit_json(json_doc(TOOL, "list", state_dir=str(args.state_dir), boot_id=view.boot_id,
                           daemon=view.daemon.as_json(), entries=[_entry_json(e, s) for e, s in entries],
                           cluster=None if cluster is None else cv.view_json(cluster, args.uuid, args.luid)))
        _cluster_unreadable(cluster)
        return EXIT_OK
    print(f"state dir {args.state_dir}: {view.daemon.describe()}; this boot {view.boot_id}")
    if not entries:
        print("no instances")
    else:
        _list_entries(view, entries)
    if cluster is not None:
        print()
        print("\n".join(cv.view_lines(cluster, args.uuid, args.luid)))
    _cluster_unreadable(cluster)
    return EXIT_OK


def _list_entries(view: sv.StoreView, entries: list[tuple[sv.EnvView, sv.StateView | None]]) -> None:
    rows, reasons = [], []
    for ev, s in entries:
        uuid = ev.uuid if ev.uuid is not None else ev.name
        if s is None:
            rows.append([uuid, "-", "damaged", "-", "-", "-", "-", "-", "-", "-"])
            reasons.append(ev.damage_reason())
            continue
        name = "retained" if s.kind == "retained" else luid_hex(s.luid)
        if ev.kind == "moved-aside":
            name += " (moved aside)"
        rows.append([uuid, name, s.verdict, s.state or "-", str(s.generation),
                     _short_boot(s.boot_id, view.boot_id),
                     str(s.region_count or "-"), "-" if s.in_sync() is None else str(s.in_sync()),
                     "-" if s.dirty() is None else str(s.dirty()), when(s.committed_at)])
        reasons.append(s.reason)
    lines = table(rows, ["uuid", "instance", "verdict", "state", "gen", "boot", "regions", "in sync", "dirty",
                         "committed"], right={4, 6, 7, 8})
    print(lines[0])
    for line, reason in zip(lines[1:], reasons, strict=True):
        print(line)
        if reason:
            print(f"    {reason}")


# --- verify --------------------------------------------------------------------------------------


def _verify_json(ev: sv.EnvView, errors: list[sv.Finding], warnings: list[sv.Finding],
                 findings: list[sv.Finding], checked: dict[str, Any]) -> dict[str, Any]:
    sync = [{"instance": "retained" if s.kind == "retained" else luid_hex(s.luid), "in_sync": s.in_sync(),
             "region_count": s.region_count or None} for s in ev.states]
    return {"uuid": ev.uuid, "dir": ev.name, "kind": ev.kind, "healthy": not (errors or warnings),
            "errors": len(errors), "warnings": len(warnings), "checked": checked, "sync": sync,
            "findings": [f.as_json() for f in findings]}


def cmd_verify(args: argparse.Namespace) -> int:
    _state_dir(args)
    boot_id = current_boot_id(args.boot_id)
    view = sv.read_store(args.state_dir, boot_id, uuids=[args.uuid] if args.uuid else None)
    cluster = _cluster(args.state_dir)
    selected = [args.uuid] if args.uuid else None
    if args.uuid and view.env(args.uuid) is None and not view.envs and not (
            cluster is not None and cluster.logs(selected)):
        raise ToolError(f"no store (and no clustered log) for uuid {args.uuid!r} in {args.state_dir}")
    results = []
    journal = view.journal
    journal_findings = journal.findings if journal is not None else []
    problems = sum(1 for f in journal_findings if f.level in ("error", "warning"))
    for ev in view.envs:
        findings = ev.all_findings()
        errors = [f for f in findings if f.level == "error"]
        warnings = [f for f in findings if f.level == "warning"]
        problems += len(errors) + len(warnings)
        records = sum(d.get("entries", 0) for d in ev.databases.values())
        checked = {
            "lmdb_opened": ev.opened, "sub_databases": len(ev.databases), "records": records,
            "instances": len(ev.instances), "retained": ev.retained is not None,
            # Instances whose journal was checked: a checkpoint (layout 3) or an old journal file.
            "journals": sum(1 for s in ev.instances if s.journal and (s.journal.checkpoint is not None
                                                                       or s.journal.exists)),
        }
        results.append((ev, errors, warnings, findings, checked))
    cluster_findings = [] if cluster is None else cluster.findings_for(selected)
    cluster_problems = [f for f in cluster_findings if f.level in ("error", "warning")]
    problems += len(cluster_problems)
    ok = problems == 0
    if args.json:
        emit_json(json_doc(TOOL, "verify", state_dir=str(args.state_dir), boot_id=boot_id, healthy=ok,
                           daemon=view.daemon.as_json(),
                           journal=journal.as_json() if journal is not None else None,
                           stores=[_verify_json(ev, e, w, fs, c) for ev, e, w, fs, c in results],
                           ignored=view.ignored,
                           cluster=None if cluster is None else cv.view_json(cluster, selected)))
        return EXIT_OK if ok else EXIT_PROBLEMS
    print(f"state dir {args.state_dir}: {view.daemon.describe()}; this boot {boot_id}")
    if journal is not None:
        sc = journal.scan
        state = "no journal yet" if not sc.exists else (
            f"journal {sc.journal_id.hex() if sc.journal_id else '?'}: {len(sc.segments)} segment(s) read, "
            f"{len(sc.records)} record(s) from {sc.base} to {sc.end}, durable up to at least {sc.durable}")
        bad = [f for f in journal_findings if f.level in ("error", "warning")]
        print(f"\njournal: {'OK' if not bad else f'{len(bad)} problem(s)'}; {state}")
        for f in journal_findings:
            print(f"  {f.level:<7}  {f.where}: {f.message}")
    for ev, errors, warnings, findings, checked in results:
        verdict = "OK" if not (errors or warnings) else f"{len(errors)} error(s), {len(warnings)} warning(s)"
        print(f"\n{ev.uuid!r} ({ev.name}{', moved aside' if ev.kind == 'moved-aside' else ''}): {verdict}")
        if ev.opened:
            print(f"  LMDB: opened read-only, {checked['sub_databases']} sub-database(s), "
                  f"{checked['records']} record(s) read; {checked['instances']} instance(s)"
                  f"{', retained state' if checked['retained'] else ''}, {checked['journals']} journal(s)")
        for s in ev.states:
            if s.sync is not None:
                name = "retained" if s.kind == "retained" else luid_hex(s.luid)
                geometry = "damaged (below)" if s.damaged else "geometry ok"
                print(f"  {name}: {s.region_count} regions, {geometry}, {s.in_sync()} in sync (popcount), "
                      f"{s.dirty()} dirty")
        for f in findings:
            print(f"  {f.level:<7}  {f.where}: {f.message}")
    if cluster is not None:
        verdict = "OK" if not cluster_problems else f"{len(cluster_problems)} problem(s)"
        print(f"\ncluster: {verdict}")
        print("\n".join(cv.view_lines(cluster, selected)))
    if view.ignored:
        print(f"\nignored (not stores): {', '.join(view.ignored)}")
    also = "" if cluster is None else " and the cluster state"
    print(f"\n{'healthy' if ok else 'PROBLEMS FOUND'}: {len(view.envs)} store(s){also} checked, "
          f"{problems} problem(s)")
    return EXIT_OK if ok else EXIT_PROBLEMS


# --- destructive commands: lock, plan, confirm, apply --------------------------------------------


@dataclass
class Change:
    """One change a destructive command makes (or would make)."""

    action: str
    uuid: str
    text: str
    details: dict[str, Any] = field(default_factory=dict)
    apply: Callable[[LmdbBackend], None] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "uuid": self.uuid, "description": self.text, **self.details}


def _run_destructive(args: argparse.Namespace, command: str,
                     plan: Callable[[sv.StoreView], list[Change]], create_state_dir: bool = False,
                     uuids: list[str] | None = None) -> int:
    state_dir = _state_dir(args, fresh_ok=create_state_dir)
    if not state_dir.is_dir() and not args.dry_run:
        prepare_state_dir(state_dir)
    lock = StateDirLock(state_dir)
    notes: list[str] = []
    locked = False
    if not args.dry_run and state_dir.is_dir():
        locked = lock.acquire()
        if not locked:
            status = daemon_status(state_dir)
            who = status.describe() if status.running else "another process holds the state directory's lock"
            if not args.force:
                raise Refused(f"{who}: refusing to change the store under it (stop dm-ulogd first; --force "
                              "changes the store anyway, but a running daemon keeps its own state in memory, "
                              "does not see the change until it restarts, and may overwrite it)")
            notes.append(f"--force: {who}; changing the store anyway")
    try:
        boot_id = current_boot_id(args.boot_id)
        view = sv.read_store(state_dir, boot_id, uuids=uuids) if state_dir.is_dir() else \
            sv.StoreView(state_dir, boot_id, daemon_status(state_dir), exists=False)
        changes = plan(view)
        for n in notes:
            print(f"{TOOL}: {n}", file=sys.stderr)
        if not changes:
            if args.json:
                emit_json(json_doc(TOOL, command, state_dir=str(state_dir), dry_run=args.dry_run, changes=[]))
            else:
                print("nothing to do")
            return EXIT_OK
        if args.dry_run:
            if args.json:
                emit_json(json_doc(TOOL, command, state_dir=str(state_dir), dry_run=True,
                                   changes=[c.as_json() for c in changes]))
            else:
                print("would (dry run, nothing changed):")
                for c in changes:
                    print(f"  {c.text}")
            return EXIT_OK
        if not args.yes and sys.stdin.isatty():
            print("plan:", file=sys.stderr)
            for c in changes:
                print(f"  {c.text}", file=sys.stderr)
        confirm(f"{command}: make these {len(changes)} change(s)?", args.yes)
        backend = LmdbBackend(state_dir)
        # A store of layout 1-2 is migrated when the backend first opens it; the migration folds
        # the journal files of instances of the current boot only, so it must know the boot.
        backend.boot_id = boot_id
        done: list[Change] = []
        try:
            for c in changes:
                if c.apply is not None:
                    c.apply(backend)
                done.append(c)
                if not args.json:
                    print(c.text)
        finally:
            backend.close()
            if args.json:
                emit_json(json_doc(TOOL, command, state_dir=str(state_dir), dry_run=False,
                                   changes=[c.as_json() for c in done]))
    finally:
        if locked:
            lock.release()
    return EXIT_OK


def _stored(s: sv.StateView, clean: bitarray, sync: bitarray) -> StoredState:
    """``s`` with these bitmaps, as a retained state (same generation and origin)."""
    source = s.luid if s.luid is not None else (s.retained.source_luid if s.retained else IMPORTED_LUID)
    return StoredState(uuid=s.uuid, generation=s.generation, region_count=s.region_count,
                       clean=clean.tobytes(), sync=sync.tobytes(), source_luid=source,
                       committed_at=time.time())


def write_retained(backend: LmdbBackend, state: StoredState) -> None:
    """Replace the uuid's retained state, in one transaction: the backend's DTR path
    (``drop`` with a retained state) for luid 0, which no instance has, so nothing else goes."""
    backend.drop(state.uuid, IMPORTED_LUID, state)


# --- purge ---------------------------------------------------------------------------------------


def _purge_plan(args: argparse.Namespace, view: sv.StoreView) -> list[Change]:
    changes: list[Change] = []
    for ev in view.envs:
        if ev.kind != "store":
            continue
        targets = [s for s in ev.instances if s.verdict in ("orphaned", "superseded")
                   and (args.luid is None or s.luid == args.luid)]
        if not targets:
            continue
        if ev.damaged:
            raise Refused(f"the store of uuid {ev.uuid!r} is damaged ({ev.damage_reason()}): purge "
                          "refuses to change it; the daemon moves it aside at its next start")
        top = sv.newest(ev)
        keeper = top[0] if top and top[0] in targets and top[0].kind == "instance" else None
        retained = ev.retained
        for s in targets:
            assert s.luid is not None and s.meta is not None
            readable = None if retained is None or retained.damaged else retained.generation
            keep = s is keeper and replaces_retained(s.resumed, s.generation, readable)
            text = (f"purge uuid={s.uuid!r} luid={luid_hex(s.luid)} ({s.verdict}, {s.state}, generation "
                    f"{s.generation}, boot {s.boot_id}): sub-databases meta/clean/sync.{s.luid:016x} dropped"
                    f"{', its layout-2 journal file removed' if s.journal and s.journal.exists else ''}")
            details: dict[str, Any] = {"luid": s.luid, "luid_hex": luid_hex(s.luid), "verdict": s.verdict,
                                       "generation": s.generation, "kept_as_retained": keep,
                                       "replaced_retained_generation": retained.generation
                                       if keep and retained is not None else None}
            if keep:
                assert s.clean is not None and s.sync is not None
                was = f"replacing the one of generation {retained.generation}" if retained else "none before"
                text += (f"; its state is the uuid's newest, so it is kept as the retained state first "
                         f"(generation {s.generation}, {s.in_sync()}/{s.region_count} in sync; {was})")
                state = _stored(s, s.clean, s.sync)
                state.committed_at = s.committed_at

                def apply(b: LmdbBackend, s: sv.StateView = s, state: StoredState = state) -> None:
                    assert s.luid is not None
                    b.drop(s.uuid, s.luid, state)
            else:
                def apply(b: LmdbBackend, s: sv.StateView = s) -> None:
                    assert s.luid is not None
                    b.drop(s.uuid, s.luid, None)
            changes.append(Change("purge", s.uuid, text, details, apply))
    return changes


def cmd_purge(args: argparse.Namespace) -> int:
    return _run_destructive(args, "purge", lambda view: _purge_plan(args, view), uuids=args.uuid or None)


# --- resync --------------------------------------------------------------------------------------


def _pick_newest(ev: sv.EnvView, force: bool, what: str) -> list[sv.StateView]:
    top = sv.newest(ev)
    if not top:
        raise Refused(f"uuid {ev.uuid!r} has no state to {what}: no resumed instance and no retained state "
                      "(a new instance starts from a fresh log anyway)")
    live = [s for s in top if sv.is_live_now(s, ev.boot_id)]
    if live and not force:
        raise Refused(f"the newest state of uuid {ev.uuid!r} belongs to {live[0].label()}, live in this "
                      "boot: it changes with the mirror's I/O and the daemon holds it in memory. Suspend "
                      "the device (and stop dm-ulogd), or --force to use its last commit")
    return top


def _resync_plan(args: argparse.Namespace, view: sv.StoreView) -> list[Change]:
    ev = _env_or_fail(view, args.uuid)
    assert ev is not None
    if ev.damaged:
        raise Refused(f"the store of uuid {ev.uuid!r} is damaged ({ev.damage_reason()}): the daemon moves it "
                      "aside at its next start, which resyncs every region anyway")
    changes = []
    for s in _pick_newest(ev, args.force, "resync"):
        assert s.clean is not None and s.sync is not None
        try:
            regions = parse_ranges(args.regions, s.region_count) if args.regions is not None else \
                list(range(s.region_count))
        except ValueError as exc:
            raise ToolError(f"--regions: {exc}") from None
        clean, sync = s.clean.copy(), s.sync.copy()
        was_sync = [r for r in regions if sync[r]]
        was_clean = [r for r in regions if clean[r]]
        if not was_sync:
            continue  # every region given is out of sync already (its clean bit changes nothing)
        for r in regions:
            clean[r] = 0
            sync[r] = 0
        text = (f"resync uuid={s.uuid!r} {s.label()}: {len(was_sync)} region(s) marked out of sync "
                f"({ranges(was_sync) or 'none'}), {len(was_clean)} marked dirty; now {sync.count(1)}/"
                f"{s.region_count} in sync; the next RESUME hands them out for recovery")
        details = {"target": "retained" if s.kind == "retained" else luid_hex(s.luid), "luid": s.luid,
                   "generation": s.generation, "regions": ranges(regions),
                   "newly_out_of_sync": ranges(was_sync), "newly_dirty": ranges(was_clean),
                   "in_sync_after": sync.count(1), "region_count": s.region_count, "folded_ops": 0}
        if s.kind == "retained":
            state = _stored(s, clean, sync)

            def apply(b: LmdbBackend, state: StoredState = state) -> None:
                write_retained(b, state)
        else:
            assert s.meta is not None
            record = s.meta.instance()
            record.committed_at = time.time()
            cb = regionlog.CHUNK_BYTES
            # The bitmaps shown are the store's with the journal's records since the checkpoint
            # replayed (as the daemon's restore would): written with position=None, the checkpoint
            # becomes the journal's end, so the restore does not replay those records again.
            commit = Commit(record, split_chunks(clean.tobytes(), s.region_count, cb),
                            split_chunks(sync.tobytes(), s.region_count, cb), resized=True, position=None)
            j = s.journal
            if j is not None and j.replayed and j.ops:
                where = (f"{j.records} journal record(s) after its checkpoint" if j.layout >= 3
                         else f"its layout-{j.layout} journal file")
                text += f" (its {len(j.ops)} journal op(s), from {where}, are folded into this commit)"
                details["folded_ops"] = len(j.ops)

            def apply(b: LmdbBackend, commit: Commit = commit) -> None:
                b.commit(commit)
        changes.append(Change("resync", s.uuid, text, details, apply))
    return changes


def cmd_resync(args: argparse.Namespace) -> int:
    if args.regions is not None:
        # The syntax now, before the store is read or locked; the range is checked against the
        # state's region count in the plan.
        try:
            parse_ranges(args.regions)
        except ValueError as exc:
            raise ToolError(f"--regions: {exc}") from None
    return _run_destructive(args, "resync", lambda view: _resync_plan(args, view), uuids=[args.uuid])


# --- backup --------------------------------------------------------------------------------------


def _segment_names(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if jn.parse_segment_name(n) is not None)


def copy_journal(state_dir: Path, dest: Path, attempts: int = 5) -> dict[str, Any]:
    """Copy the journal's segments into ``dest`` while the daemon may be appending to them.

    Segments are copied **newest first**: the journal is written in position order, so every
    record an older segment holds before a newer segment's records was written before them, and
    a copy of the older segment taken after the copy of the newer one has it (the SWITCH that
    leads into the newer segment included). A segment that appears during a round (the daemon
    switched to it) makes the round start again, as does a copy that reads as damaged (a page
    copied in the middle of an append, see :func:`storeview.scan_journal`). A segment removed
    before its copy was cut by the daemon: every record in it was in the stores by then, and the
    stores are copied after the journal. Returns what ended up in ``dest``.
    """
    copied: list[str] = []
    check = jn.Scan(dest)
    for _attempt in range(attempts):
        for name in _segment_names(dest):
            (dest / name).unlink()
        names = _segment_names(state_dir)
        copied = []
        for name in reversed(names):
            try:
                shutil.copyfile(state_dir / name, dest / name)
            except FileNotFoundError:
                continue
            os.chmod(dest / name, FILE_MODE)
            copied.append(name)
        if set(_segment_names(state_dir)) - set(names):
            continue
        check = jn.scan(dest)
        if not check.damage:
            break
    return {"segments": sorted(copied),
            "journal_id": None if check.journal_id is None else check.journal_id.hex(), "end": check.end,
            "damage": [{"start": d.start, "end": d.end, "reason": d.reason} for d in check.damage],
            "problems": list(check.problems)}


def cmd_backup(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    boot_id = current_boot_id(args.boot_id)
    dest: Path = args.dir
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ToolError(f"{dest} exists and is not an empty directory")
    view = sv.read_store(state_dir, boot_id, uuids=args.uuid or None, moved_aside=False)
    dest.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(dest, DIR_MODE)
    started = time.time()
    # The journal first, then the stores. The daemon removes a journal segment once every record
    # in it is in the stores, so stores copied first could need records (after their checkpoints)
    # that are cut before the journal is copied. Copied in this order, each store snapshot is at
    # least as new as the journal copy: it needs no record older than what the copy starts with,
    # replays what the copy holds past its checkpoint, and a checkpoint past the copy's end is
    # a store ahead of its journal, which a restore accepts (formats/journal.md, §6).
    journal = copy_journal(state_dir, dest)
    copied_journal = sv.read_journal_state(dest)
    results = []
    for ev in view.envs:
        out = dest / ev.name
        out.mkdir(mode=DIR_MODE)
        error = None
        try:
            env = open_readonly(ev.path)
            try:
                env.copy(str(out), compact=True)  # one read transaction: a committed snapshot
            finally:
                env.close()
            os.chmod(out / "data.mdb", FILE_MODE)
        except (lmdb.Error, StoreFormatError) as exc:
            error = f"LMDB copy failed: {exc}"
        # Read back against the copied journal: what a daemon started on the backup restores.
        check = None if error else sv.read_env(out, ev.uuid, boot_id, journal=copied_journal)
        problems = [] if check is None else [f.message for f in check.all_findings() if f.level == "error"]
        if check is not None:
            problems += [f"luid {luid_hex(s.luid)}: {s.journal.damaged}" for s in check.instances
                         if s.journal is not None and s.journal.damaged]
        size = (out / "data.mdb").stat().st_size if not error else 0
        old_journals = []
        for name in ev.journals if ev.format is not None and ev.format.version < 3 else []:
            # Layout 1-2 stores keep a journal file per instance beside data.mdb.
            try:
                shutil.copyfile(ev.path / name, out / name)
                os.chmod(out / name, FILE_MODE)
                old_journals.append(name)
            except FileNotFoundError:
                pass
        results.append({"uuid": ev.uuid, "dir": ev.name, "data_bytes": size, "journals": old_journals,
                        "instances": len(check.instances) if check else 0,
                        "retained": bool(check and check.retained), "error": error,
                        "verify_errors": problems})
    manifest = {"tool": TOOL, "command": "backup", "json_version": 1, "source": str(state_dir.resolve()),
                "started_at": started, "finished_at": time.time(), "journal": journal, "stores": results}
    (dest / "backup.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(dest / "backup.json", FILE_MODE)
    failed = [r for r in results if r["error"] or r["verify_errors"]]
    if args.json:
        emit_json(json_doc(TOOL, "backup", state_dir=str(state_dir), dest=str(dest), journal=journal,
                           stores=results, ok=not failed))
    else:
        print(f"backup of {state_dir} into {dest} ({view.daemon.describe()}):")
        jid = journal["journal_id"] or "none"
        damage = f"; damaged: {journal['damage']}" if journal["damage"] else ""
        print(f"  journal {jid}: {len(journal['segments'])} segment(s), up to position {journal['end']}"
              f"{damage}")
        for r in results:
            state = r["error"] or ("; ".join(r["verify_errors"]) if r["verify_errors"] else "ok, read back")
            old = f", {len(r['journals'])} layout-2 journal file(s)" if r["journals"] else ""
            print(f"  {r['uuid']!r}: data.mdb {r['data_bytes']} bytes (compacted snapshot), "
                  f"{r['instances']} instance(s){', retained state' if r['retained'] else ''}{old}: {state}")
        if not results:
            print("  no stores")
        print(f"manifest: {dest / 'backup.json'}. To restore: stop dm-ulogd, move the store directories and "
              f"the journal segments (journal.*) out of {state_dir}, copy the ones in {dest} back, start "
              "dm-ulogd.")
    return EXIT_PROBLEMS if failed else EXIT_OK


# --- export / import -----------------------------------------------------------------------------


def _geometry(args: argparse.Namespace) -> int | None:
    if getattr(args, "region_count", None) is not None:
        if args.sectors is not None or args.region_size is not None:
            raise ToolError("--region-count or --sectors/--region-size, not both")
        if args.region_count < 1:
            raise ToolError("--region-count must be at least 1")
        return args.region_count
    if args.sectors is None and args.region_size is None:
        return None
    if args.sectors is None or args.region_size is None:
        raise ToolError("--sectors and --region-size go together")
    if args.sectors < 1 or args.region_size < 1:
        raise ToolError("--sectors and --region-size must be positive")
    return -(-args.sectors // args.region_size)


def _region_size_hint(ev: sv.EnvView, s: sv.StateView) -> tuple[int | None, str]:
    if s.meta is not None:
        return s.meta.region_size, f"luid {luid_hex(s.luid)}'s constructor"
    for other in sorted(ev.instances, key=lambda o: -o.generation):
        if other.meta is not None and other.region_count == s.region_count:
            return other.meta.region_size, f"luid {luid_hex(other.luid)}'s constructor"
    return None, ""


def cmd_export(args: argparse.Namespace) -> int:
    want = _geometry(args)
    if not args.overwrite:
        # Refused by disklog.write too; checked here, before the store is read.
        with contextlib.suppress(OSError):
            st = os.stat(args.disklog)
            if stat.S_ISREG(st.st_mode) and st.st_size:
                raise Refused(f"{args.disklog} exists and is not empty: refusing to overwrite it "
                              "(--overwrite to replace it)")
    boot_id = current_boot_id(args.boot_id)
    view = _read(args, [args.uuid])
    ev = _env_or_fail(view, args.uuid)
    assert ev is not None
    top = _pick_newest(ev, args.force, "export")
    s = max(top, key=lambda o: o.committed_at)
    assert s.clean is not None and s.sync is not None
    if want is not None and want != s.region_count:
        raise Refused(f"the state has {s.region_count} regions, the geometry given makes {want}: not the "
                      "same mirror (or a resize); nothing written")
    bits = s.clean & s.sync
    try:
        target = disklog.write(args.disklog, s.region_count, bits, overwrite=args.overwrite)
    except disklog.DiskLogError as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise ToolError(f"{args.disklog}: {exc.strerror or exc}") from None
    region_size, source = _region_size_hint(ev, s)
    warnings = []
    if len(top) > 1:
        warnings.append(f"{len(top)} states share the newest generation {s.generation}; exported the last "
                        "committed one (ulog-recover verify reports this)")
    if ev.damaged:
        warnings.append(f"the store is damaged elsewhere: {ev.damage_reason()}")
    if sv.is_live_now(s, boot_id):
        warnings.append("--force: exported the last commit of a live instance; the mirror may have moved on")
    n = s.region_count
    doc = {"uuid": s.uuid, "source": "retained" if s.kind == "retained" else luid_hex(s.luid),
           "source_verdict": s.verdict, "generation": s.generation, "path": target.path,
           "block_device": target.is_block, "bytes_written": disklog.log_bytes(n, target.block_size),
           "magic": disklog.MIRROR_MAGIC, "log_version": disklog.MIRROR_DISK_VERSION, "nr_regions": n,
           "clean": bits.count(1), "not_clean": bits.count(0), "not_clean_ranges": bit_ranges(bits, 0),
           "region_size": region_size, "warnings": warnings}
    if args.json:
        emit_json(json_doc(TOOL, "export", **doc))
        return EXIT_OK
    for w in warnings:
        print(f"{TOOL}: warning: {w}", file=sys.stderr)
    print(f"exported {s.label()} of uuid {s.uuid!r} ({s.verdict}) to {target.path}: disk log version "
          f"{disklog.MIRROR_DISK_VERSION}, nr_regions {n}, {doc['bytes_written']} bytes")
    print(f"  clean (clean and in sync): {bits.count(1)}/{n}; resynced when the kernel loads it: "
          f"{bits.count(0)} ({doc['not_clean_ranges'] or 'none'})")
    if region_size:
        print(f"  region size {region_size} sectors (from {source}); load it with e.g.\n"
              f"    dmsetup create NAME --table '0 <sectors> mirror disk 2 <this log device> {region_size} "
              f"2 <leg0> 0 <leg1> 0'")
    return EXIT_OK


def _import_plan(args: argparse.Namespace, view: sv.StoreView, info: disklog.DiskLogInfo,
                 count: int) -> list[Change]:
    ev = view.env(args.uuid)
    if ev is not None and ev.damaged:
        raise Refused(f"the store of uuid {args.uuid!r} is damaged ({ev.damage_reason()}); move its "
                      f"directory aside (mv {ev.path} {ev.path}.damaged-manual) and import into a new store")
    if ev is not None and not args.force:
        live = [s for s in ev.instances if sv.is_live_now(s, view.boot_id)]
        if live:
            raise Refused(f"uuid {args.uuid!r} has an instance live in this boot ({live[0].label()}): its "
                          "next RESUME would replace the running mirror's state with the import; --force "
                          "to do it")
    bits = disklog.kernel_resume_bits(info, count)
    generation = (ev.max_generation() if ev else 0) + 1
    retained = ev.retained if ev else None
    state = StoredState(uuid=args.uuid, generation=generation, region_count=count, clean=bits.tobytes(),
                        sync=bits.tobytes(), source_luid=IMPORTED_LUID, committed_at=time.time())
    was = (f"replacing the retained state of generation {retained.generation}" if retained
           else "no retained state before")
    text = (f"import {args.disklog} into uuid={args.uuid!r} as its retained state: generation {generation} "
            f"({was}), {count} regions, {bits.count(1)} in sync, {bits.count(0)} to resync "
            f"({bit_ranges(bits, 0) or 'none'}); the next CTR + RESUME of the uuid adopts it")
    details = {"generation": generation, "region_count": count, "in_sync": bits.count(1),
               "out_of_sync_ranges": bit_ranges(bits, 0), "source": args.disklog,
               "replaced_retained_generation": retained.generation if retained else None,
               "disklog_nr_regions": info.nr_regions}
    return [Change("import", args.uuid, text, details, lambda b: write_retained(b, state))]


def cmd_import(args: argparse.Namespace) -> int:
    count = _geometry(args)
    _state_dir(args, fresh_ok=True)
    try:
        info, _target = disklog.read(args.disklog, count)
    except OSError as exc:
        raise ToolError(f"{args.disklog}: {exc.strerror or exc}") from None
    except disklog.DiskLogError as exc:
        raise ToolError(f"{args.disklog}: {exc}") from None
    if info.kind in (disklog.BAD_MAGIC, disklog.BAD_VERSION, disklog.EMPTY, disklog.TOO_SHORT,
                     disklog.TOO_SMALL, disklog.TOO_MANY):
        raise Refused(f"{args.disklog} is not a usable disk log: {info.reason}; nothing to import "
                      "(a new log resyncs every region anyway)")
    if count is None:
        if info.kind != disklog.VALID:
            raise Refused(f"{args.disklog}: {info.reason}; give the mirror's geometry "
                          "(--sectors N --region-size N, or --region-count N)")
        count = info.nr_regions
    assert count is not None
    if info.clean is None:
        raise Refused(f"{args.disklog} holds too few bits for {count} regions: " + "; ".join(info.notes))
    if info.nr_regions != count and info.kind == disklog.VALID:
        print(f"{TOOL}: note: the log says {info.nr_regions} regions, the geometry {count}: as the kernel "
              f"would, regions from {info.nr_regions} on are taken as dirty and bits past {count} dropped",
              file=sys.stderr)
    return _run_destructive(args, "import", lambda view: _import_plan(args, view, info, count),
                            create_state_dir=True, uuids=[args.uuid])


# --- the command line ----------------------------------------------------------------------------

EXIT_TEXT = fill("exit status: 0 done (verify: healthy); 1 problems found (verify), or refused / not "
             "confirmed (nothing changed); 2 could not run (bad arguments, not a ulog-disk state directory, "
             "no such store or file, I/O error), with one line 'ulog-recover: what is wrong' on stderr.")

SAFETY_TEXT = fill(
    "safety: this command changes the store. It takes the state directory's lock for its whole run "
    "and refuses while dm-ulogd holds it (stop the daemon first; --force goes ahead, but a running "
    "daemon does not see the change until it restarts and may overwrite it). On a terminal it shows "
    "the plan and asks before changing anything; when stdin is not a terminal it changes nothing "
    "unless --yes is given. --dry-run shows the plan only. Every change made is printed.")


def _selection_options(p: argparse.ArgumentParser, luid: bool = True) -> None:
    """--uuid (repeatable) and --luid: which instances a command works on (default: all)."""
    p.add_argument("--uuid", action="append", metavar="UUID", help="only this uuid (repeatable)")
    if luid:
        p.add_argument("--luid", type=parse_luid, metavar="LUID", help="only this instance (hex luid)")


def _destructive_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="go ahead although dm-ulogd holds the state "
                   "directory (and, where the command says so, although the state is live)")
    p.add_argument("--yes", "-y", action="store_true",
                   help="do not ask; required when stdin is not a terminal")
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would change, change nothing")


def build_parser() -> argparse.ArgumentParser:
    common = ToolParser(add_help=False)
    add_store_options(common)
    common.add_argument("--json", action="store_true",
                        help="JSON instead of text (keys: formats/tools-json.md)")
    p, commands = tool_parser(
        TOOL, __version__, common=common,
        description=(
                    "Inspect and repair the dirty-log store of dm-ulogd after something went wrong: which "
                    "instances are live, suspended, orphaned by a reboot, superseded or damaged; check the "
                    "store; remove what nobody needs; force a resync of regions; back the store up while the "
                    "daemon runs; move a mirror's log between dm-ulogd and the kernel's own 'disk' log."),
        epilog="Run 'ulog-recover COMMAND --help' for each. Read-only commands (list, verify, backup,\n"
               "export) never block or disturb a running daemon.\n\n" + EXIT_TEXT + "\n",
    )

    verdicts = (
        "verdicts:\n"
        "  live, presuspended  resumed in this boot by the running kernel\n"
        "  suspended           suspended in this boot; hands its state to the next instance that resumes\n"
        "  constructed         loaded in this boot, never resumed (an inactive table)\n"
        "  orphaned            recorded under another boot id: its kernel is gone; if it holds the\n"
        "                      uuid's newest state, the next RESUME of the uuid adopts it\n"
        "  superseded          another instance adopted its state (superseded flag), or another state of\n"
        "                      the uuid has a higher generation: never handed over again\n"
        "  retained            the state left by the uuid's last DTR (adopted by the next RESUME)\n"
        "  damaged             fails verification: the daemon moves the uuid's store aside at its next\n"
        "                      start (a full resync); stores already moved aside are listed too\n"
    )
    s = commands.add("list", cmd_list,
                       help="every instance with its verdict and why",
                       description=(
                                   "List every instance (and retained state) of every uuid in the store with "
                                   "a verdict and the reason for it. A state directory of dm-ulogd --cluster "
                                   "also has its cluster state (DIR/cluster: the snapshot and the AGREED "
                                   "records after it, as a restart loads them): its generation (epoch, "
                                   "snapshot id and epoch), the departed nodes waiting for a fence, and per "
                                   "clustered log the regions and how many are in sync, the nodes that have "
                                   "it open (node id, luid, boot id), each node's marked regions (count and "
                                   "ranges), the regions held for an unfenced node, the released regions and "
                                   "which node recovers which region. A cluster state that cannot be read "
                                   "is said so and makes the exit status 2. Reads only."),
                       epilog=verdicts + "\nexamples:\n  ulog-recover list\n"
                              "  ulog-recover list --uuid LVM-abc --json\n")
    _selection_options(s)

    s = commands.add(
        "verify", cmd_verify,
        help="LMDB-level check and the store's invariants (exit 1 on problems)",
        description=(
                    "Check every store (or one uuid's). LMDB level: the environment opens read-only, every "
                    "sub-database is opened and read whole, every record is decoded. Invariants: the format "
                    "record names the directory's uuid; each meta names its luid and uuid; bitmap geometry "
                    "matches the region count (chunk count and lengths); padding bits past the last region "
                    "are 0; no chunk is missing once an instance has committed; generations are consistent "
                    "(a never-resumed instance has generation 0; non-zero generations are unique per uuid; "
                    "an instance flagged superseded is never the newest; at most one instance per uuid is "
                    "live in this boot); file modes are private. The journal (formats/journal.md): "
                    "its segments "
                    "belong to one journal id and read without damage (a record that fails while a later "
                    "one says the journal was durable past it); each instance has a checkpoint record that "
                    "names this journal (a checkpoint past the journal's end is fine: the store is ahead) "
                    "and no damage follows it, else the daemon's restore takes that instance as all dirty "
                    "and out of sync. A store of layout 1 or 2 is read as it is and noted (the daemon "
                    "migrates it, folding each instance's journal file in). "
                    "The store keeps no sync count of its own (the daemon counts the sync bitmap when it "
                    "loads it), so the count shown is the popcount. The cluster state of dm-ulogd --cluster "
                    "(DIR/cluster), when there is one: the snapshot and the cluster journal read without "
                    "damage (a snapshot that cannot be read, or is inconsistent, is an error: the daemon "
                    "refuses to start clustered on it), every AGREED record applies and the epochs follow "
                    "one another, and the state's invariants hold: the in-sync count is the bitmap's, no "
                    "region marked by a node or held for a departed node's fence counts as clean, held and "
                    "released regions and regions being recovered are out of sync, held regions are handed "
                    "to nobody and belong to a node waiting for its fence. With UUID only that clustered "
                    "log's findings count (and those of the whole directory). Reads only."),
        epilog="levels: error = damage (the daemon moves the store aside at its next start); warning =\n"
               "inconsistent, or journal damage the daemon meets with a full resync of the instances it\n"
               "touches; note = worth knowing, not a problem. Errors and warnings make the exit status 1.\n"
               "\nexamples:\n  ulog-recover verify\n"
               "  ulog-recover verify LVM-abc --json\n")
    s.add_argument("uuid", nargs="?", metavar="UUID",
                   help="only the store of this uuid (default: every store)")

    s = commands.add(
        "purge", cmd_purge,
        help="remove orphaned and superseded instances (keeps the newest state)",
        description=(
                    "Remove the instances whose verdict is orphaned or superseded (see 'list'): their three "
                    "sub-databases, one transaction each (its journal records are then never read). "
                    "An orphaned instance that holds "
                    "its uuid's newest state is first kept as the uuid's retained state in the same "
                    "transaction (the daemon adopts a retained state exactly as it adopts an orphaned "
                    "instance), so purge never costs a resync. Live, suspended, constructed and retained "
                    "states are never touched."),
        epilog=SAFETY_TEXT + "\n\nexamples:\n  ulog-recover purge --dry-run\n  ulog-recover purge --uuid "
               "LVM-abc --yes\n")
    _selection_options(s)
    _destructive_options(s)

    s = commands.add(
        "resync", cmd_resync,
        help="mark regions out of sync in a uuid's newest state",
        description=(
                    "Mark regions of a uuid's newest state out of sync (and dirty), so the next RESUME of "
                    "the mirror hands them to the kernel for recovery: the legs are copied again for those "
                    "regions. The newest state is the one the next RESUME adopts: the retained state, or a "
                    "suspended or orphaned instance (the highest generation). An instance's journal "
                    "records since its checkpoint are folded into the commit (replayed as the daemon's "
                    "restore would) and its "
                    "checkpoint moves to the journal's end. When the newest state is live in this boot the "
                    "command refuses "
                    "unless --force; the change then takes effect at the instance's next resume "
                    "(dmsetup suspend + resume) after dm-ulogd restarts."),
        epilog=SAFETY_TEXT + "\n\nexamples:\n  ulog-recover resync LVM-abc                  # every region\n"
               "  ulog-recover resync LVM-abc --regions 0-17,42,100-199 --yes\n")
    s.add_argument("uuid", metavar="UUID", help="the mirror's uuid (the one in its table, e.g. LVM-...)")
    s.add_argument("--regions", metavar="RANGES", help="regions as ranges, e.g. 0-17,42 (default: all)")
    _destructive_options(s)

    s = commands.add(
        "backup", cmd_backup,
        help="consistent copy of every store while the daemon runs",
        description=(
                    "Copy the journal and every store into DIR (created; must be new or empty) while "
                    "dm-ulogd "
                    "runs. The journal segments first, newest first (a round is redone if a segment appears "
                    "meanwhile), then each environment as a compacted LMDB snapshot (one read transaction, "
                    "consistent, never blocking the daemon). In that order the copy is consistent: a store "
                    "snapshot is never older than the journal copy, so every record it needs past its "
                    "checkpoint that the copy could hold is in it (the daemon removes a segment only once "
                    "its records are in the stores, which is why the stores are not copied first), and a "
                    "checkpoint past the copy's end is a store ahead of its journal, which a restore "
                    "accepts. Each store is read back against the copied journal and verified; "
                    "DIR/backup.json lists what was copied. Stores moved aside as damaged are not copied."),
        epilog="restoring: stop dm-ulogd, move the store directories (u.* and x.*) and the journal\n"
               "segments (journal.*) out of the state directory, copy everything from DIR back into it\n"
               "(cp -a DIR/. STATE_DIR/), start dm-ulogd (a store whose checkpoint names a journal that\n"
               "is not there comes back all dirty: the stores and the journal go back together).\n"
               "Instances then continue from the backup's commits; anything committed after\n"
               "the backup is lost (regions the mirror dirtied since are covered only if the kernel\n"
               "still holds them; a 'resync' of the affected uuids is the safe choice).\n\n"
               "examples:\n  ulog-recover backup /root/ulog-backup-$(date +%F)\n")
    s.add_argument("dir", type=Path, metavar="DIR",
                   help="where the copy goes (created; must be new or empty)")
    _selection_options(s, luid=False)

    s = commands.add(
        "export", cmd_export,
        help="write a uuid's newest state as a kernel 'disk' log",
        description=(
                    "Write a uuid's newest state (the retained state, or a suspended or orphaned instance: "
                    "the highest generation) as the kernel's 'disk' dirty log (header magic 0x4D695272, "
                    "version 2, nr_regions, clean bits at byte 1024; formats/disklog.md), so the mirror can "
                    "run with the in-kernel 'disk' log without a full resync. A region is written clean only "
                    "if it is clean and in sync (the kernel's disk log keeps one bit: clean = in sync); "
                    "every other region is resynced when the kernel loads the log. A file is padded to "
                    "whole 512-byte sectors; a block device (opened exclusively: refused if in use) gets "
                    "the log at its start, padded to its logical block size. Reads the store only."),
        epilog="then load it:\n"
               "  dmsetup create NAME --table '0 SECTORS mirror disk 2 LOGDEV REGION_SIZE 2 LEG0 0 LEG1 0'\n"
               "(default sync mode: with 'sync' or 'nosync' the kernel ignores the stored bits).\n\n"
               "examples:\n  ulog-recover export LVM-abc --disklog /dev/vg/lv_mlog\n"
               "  ulog-recover export LVM-abc --disklog /tmp/abc.log --sectors 2097152 --region-size 1024\n")
    s.add_argument("uuid", metavar="UUID", help="the mirror's uuid whose state is exported")
    s.add_argument("--disklog", required=True, metavar="FILE|DEVICE", help="where to write the disk log")
    s.add_argument("--sectors", type=int, metavar="N", help="mirror length in sectors (with --region-size: "
                   "checked against the state's region count)")
    s.add_argument("--region-size", type=int, metavar="N", help="region size in sectors")
    s.add_argument("--force", action="store_true", help="export the last commit of a state that is live in "
                   "this boot (it may be behind the running mirror)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing non-empty file")

    s = commands.add(
        "import", cmd_import,
        help="read a kernel 'disk' log into the store as a uuid's retained state",
        description=("Read a kernel 'disk' dirty log (file or device) and store its state as the uuid's "
                    "retained state, with a generation above every other state of the uuid, so the next "
                    "CTR + RESUME of the uuid (a 'mirror userspace' table served by dm-ulogd) adopts it "
                    "and resyncs only the regions that were not clean. The bits are taken as the kernel "
                    "would at resume: regions at and past the header's nr_regions are dirty. The region "
                    "count comes from nr_regions, or from --sectors/--region-size or --region-count "
                    "(needed for LVM's fresh-log marker). A log with a bad magic or version is refused. "
                    "Refuses when an instance of the uuid is live in this boot, unless --force."),
        epilog=SAFETY_TEXT + "\n\nexamples:\n  ulog-recover import LVM-abc --disklog /dev/vg/lv_mlog\n"
               "  ulog-recover import LVM-abc --disklog /tmp/abc.log --sectors 2097152 --region-size 1024 "
               "--yes\n")
    s.add_argument("uuid", metavar="UUID", help="the mirror's uuid the state is stored for")
    s.add_argument("--disklog", required=True, metavar="FILE|DEVICE", help="the disk log to read")
    s.add_argument("--sectors", type=int, metavar="N", help="mirror length in sectors (with --region-size)")
    s.add_argument("--region-size", type=int, metavar="N", help="region size in sectors")
    add_region_count_option(s, help="region count (instead of --sectors/--region-size)")
    _destructive_options(s)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_tool(TOOL, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
