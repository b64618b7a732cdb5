"""ulog-dump: decode the store, the journal, a capture of kernel frames, or the kernel's disk log.
Read-only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..daemon.cli import tool_parser
from ..protocol import capture
from ..storage import disklog
from ..storage import journal as jn
from ..storage.cluster_store import ClusterStoreError, read_snapshot_file
from . import clusterview as cv
from . import storeview as sv
from . import wiredump as wd
from .common import (
    EXIT_OK,
    ToolError,
    add_region_count_option,
    add_state_dir_option,
    add_store_options,
    bit_ranges,
    check_state_dir,
    current_boot_id,
    daemon_status,
    emit_json,
    iso,
    json_doc,
    luid_hex,
    os_error_text,
    parse_luid,
    run_tool,
    state_dir_of,
    table,
    when,
)

TOOL = "ulog-dump"

# --- store ---------------------------------------------------------------------------------------


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def env_json(ev: sv.EnvView, regions: bool, luid: int | None = None) -> dict[str, Any]:
    fmt = ev.format
    return {
        "uuid": ev.uuid, "dir": ev.name, "path": str(ev.path), "kind": ev.kind,
        "moved_at": ev.moved_at, "damaged": ev.damaged,
        "damage_reason": ev.damage_reason() or None,
        "format": None if fmt is None else {
            "version": fmt.version, "chunk_bytes": fmt.chunk_bytes, "created_at": fmt.created_at,
            "created_at_iso": iso(fmt.created_at)},
        "data_bytes": ev.data_bytes,
        "lmdb": {**ev.stat, **ev.info} if ev.opened else None,
        "instances": [s.as_json(regions) for s in ev.instances if luid is None or s.luid == luid],
        "retained": ev.retained.as_json(regions) if ev.retained and luid is None else None,
        "findings": [f.as_json() for f in ev.findings],
    }


GRID_LEGEND = "'.' clean and in sync, 'd' dirty, 'o' out of sync, 'x' dirty and out of sync"


def region_grid(s: sv.StateView, indent: str) -> list[str]:
    assert s.clean is not None and s.sync is not None
    width = len(str(max(0, s.region_count - 1)))
    out = []
    for start in range(0, s.region_count, 64):
        cells = []
        for r in range(start, min(start + 64, s.region_count)):
            clean, sync = s.clean[r], s.sync[r]
            cells.append("." if clean and sync else "d" if sync else "o" if clean else "x")
        groups = " ".join("".join(cells[i : i + 8]) for i in range(0, len(cells), 8))
        out.append(f"{indent}{start:>{width}}  {groups}")
    return out


def state_lines(s: sv.StateView, boot_id: str, regions: bool, indent: str = "  ") -> list[str]:
    m = s.meta
    if s.kind == "retained":
        title = f"{indent}retained state"
        src = luid_hex(s.retained.source_luid) if s.retained else "?"
        src_text = "imported (no instance)" if s.retained and s.retained.source_luid == 0 else f"luid {src}"
    else:
        title = f"{indent}instance {luid_hex(s.luid)}"
    head = f"{title}: {s.verdict}" + (f" -- {s.reason}" if s.reason else "")
    rows: list[tuple[str, str]] = []
    if m is not None:
        rows.append(("state", f"{m.state}{', resumed' if m.resumed else ', never resumed'}"
                     f"{', superseded flag' if m.superseded else ''}"))
    if s.meta or s.retained:
        rows.append(("generation", str(s.generation)))
    if m is not None:
        rows.append(("constructor", f"{m.ctr!r} ({m.log_type}, region size {m.region_size} sectors)"))
    if s.kind == "retained" and s.retained:
        rows.append(("from", src_text))
    if s.clean is not None and s.sync is not None:
        in_sync = s.in_sync() or 0
        rows.append(("regions", f"{s.region_count}: {in_sync} in sync, {s.region_count - in_sync} "
                     f"out of sync, {s.dirty()} dirty"))
        rows.append(("out of sync", s.out_of_sync_ranges() or "none"))
        rows.append(("dirty", s.dirty_ranges() or "none"))
    if m is not None:
        this = " (this boot)" if m.boot_id == boot_id else " (another boot)"
        rows.append(("boot id", (m.boot_id or "?") + this))
        # Layout 3 keeps the journal position of the meta's last write in commit_seq.
        seq = f"journal position {m.commit_seq}" if s.journal is not None and s.journal.layout >= 3 \
            else f"commit {m.commit_seq}"
        rows.append(("committed", f"{when(s.committed_at)} ({seq}), cursor {m.cursor}"))
    elif s.retained:
        rows.append(("committed", when(s.committed_at)))
    if s.journal is not None:
        rows.append(("journal", s.journal.describe()))
    for f in s.findings:
        rows.append((f.level, f"{f.where}: {f.message}"))
    width = max((len(k) for k, _ in rows), default=0)
    out = [head] + [f"{indent}    {k.ljust(width)}  {v}" for k, v in rows]
    if regions and s.clean is not None and s.sync is not None:
        out.append(f"{indent}    regions ({GRID_LEGEND}):")
        out.extend(region_grid(s, indent + "      "))
    return out


def env_lines(ev: sv.EnvView, boot_id: str, regions: bool, luid: int | None) -> list[str]:
    fmt = ev.format
    bits = [ev.name]
    if ev.kind == "moved-aside":
        bits.append(f"moved aside {when(ev.moved_at)}")
    if fmt is not None:
        bits.append(f"format {fmt.version}, {fmt.chunk_bytes}-byte chunks, created {when(fmt.created_at)}")
    bits.append(f"data.mdb {_kib(ev.data_bytes)}")
    out = [f"uuid {ev.uuid!r}  ({'; '.join(bits)})"]
    if ev.damaged:
        out.append(f"  DAMAGED: {ev.damage_reason()}")
    for f in ev.findings:
        out.append(f"  {f.level}: {f.where}: {f.message}")
    shown = [s for s in ev.instances if luid is None or s.luid == luid]
    if ev.retained and luid is None:
        shown.append(ev.retained)
    if not shown:
        out.append("  no instances" + (f" with luid {luid_hex(luid)}" if luid is not None else "")
                   + " and no retained state")
    for s in shown:
        out.append("")
        out.extend(state_lines(s, boot_id, regions))
    return out


def cmd_store(args: argparse.Namespace) -> int:
    path = state_dir_of(args)
    only = None
    state_dir = path
    if sv.env_dir_argument(path):
        only, state_dir = path, path.parent
    else:
        check_state_dir(path)
    boot_id = current_boot_id(args.boot_id)
    view = sv.read_store(state_dir, boot_id, uuids=args.uuid or None, only=only)
    if args.uuid:
        missing = set(args.uuid) - {e.uuid for e in view.envs}
        if missing:
            raise ToolError(f"no store for uuid {', '.join(sorted(map(repr, missing)))} in {state_dir}")
    if args.luid is not None:
        view.envs = [e for e in view.envs if any(s.luid == args.luid for s in e.instances)]
        if not view.envs:
            raise ToolError(f"no instance with luid {luid_hex(args.luid)}")
    cdir = cv.cluster_dir(state_dir) if only is None else None
    cluster = None if cdir is None else cv.read_cluster(cdir)
    if args.json:
        emit_json(json_doc(TOOL, "store", state_dir=str(state_dir), boot_id=boot_id,
                           daemon=view.daemon.as_json(),
                           journal=view.journal.as_json() if view.journal else None,
                           stores=[env_json(e, args.per_region, args.luid) for e in view.envs],
                           ignored=view.ignored,
                           cluster=None if cluster is None else cv.view_json(cluster, args.uuid or None,
                                                                            args.luid)))
        return EXIT_OK
    lines = [f"state dir {state_dir}: {view.daemon.describe()}; this boot {boot_id}; "
             f"{len(view.envs)} store(s)"]
    if view.journal is not None:
        lines.append(journal_summary(view.journal))
        lines.extend(f"  {f.level}: {f.where}: {f.message}" for f in view.journal.findings)
    for e in view.envs:
        lines.append("")
        lines.extend(env_lines(e, boot_id, args.per_region, args.luid))
    if cluster is not None:
        lines.append("")
        lines.append(cluster_summary(cluster))
    if view.ignored:
        lines.append("")
        lines.append(f"ignored (not stores): {', '.join(view.ignored)}")
    print("\n".join(lines))
    return EXIT_OK


# --- cluster -------------------------------------------------------------------------------------


def cluster_summary(view: cv.ClusterView) -> str:
    """One line for ``store``: where the cluster state is at ('ulog-dump cluster' shows it)."""
    if view.state is None:
        return f"cluster state: CANNOT BE READ ({view.error}); see 'ulog-dump cluster'"
    problems = f", {len(view.problems)} problem(s)" if view.problems else ""
    return (f"cluster state: {view.generation()}, {len(view.state.logs)} clustered log(s){problems} "
            "(shown by 'ulog-dump cluster')")


def _cluster_dir_argument(args: argparse.Namespace) -> tuple[Path, Path]:
    """(state directory, cluster directory) of the command line: a state directory or its
    ``cluster`` directory itself."""
    path = state_dir_of(args)
    if cv.is_cluster_dir(path) and cv.cluster_dir(path) is None:
        return path.parent, path
    check_state_dir(path)
    directory = cv.cluster_dir(path)
    if directory is None:
        raise ToolError(f"{path}: no cluster state in it (no {cv.CLUSTER_DIR}/ directory: dm-ulogd never "
                        "ran there with --cluster)")
    return path, directory


def cmd_cluster(args: argparse.Namespace) -> int:
    state_dir, directory = _cluster_dir_argument(args)
    view = cv.read_cluster(directory)
    daemon = daemon_status(state_dir)
    uuids = args.uuid or None
    if uuids and view.state is not None:
        missing = set(uuids) - set(view.state.logs)
        if missing:
            raise ToolError(f"no clustered log {', '.join(sorted(map(repr, missing)))} in {directory}")
    if args.json:
        emit_json(json_doc(TOOL, "cluster", state_dir=str(state_dir), daemon=daemon.as_json(),
                           **cv.view_json(view, uuids)))
    else:
        lines = [f"state dir {state_dir}: {daemon.describe()}"]
        sc = view.scan
        if sc is not None:
            lines.append(f"cluster {journal_summary(sv.JournalState(sc))}")
        lines.extend(cv.view_lines(view, uuids, cursors=True))
        print("\n".join(lines))
    if view.error is not None:
        raise ToolError(f"the cluster state cannot be read: {view.error}")
    return EXIT_OK


# --- journal -------------------------------------------------------------------------------------


def journal_summary(js: sv.JournalState) -> str:
    sc = js.scan
    if js.error:
        return f"journal: cannot be read ({js.error})"
    if not sc.exists:
        return "journal: none in the state directory (the daemon starts one)"
    return (f"journal {sc.journal_id.hex() if sc.journal_id else '?'}: {len(sc.segments)} segment(s), "
            f"records from {sc.base} to {sc.end}, durable up to at least {sc.durable}"
            + (f", {len(sc.damage)} damaged range(s)" if sc.damage else ""))


def ops_text(ops: list[tuple[int, int]], limit: int | None = 32) -> str:
    """``mark 5, clear 7``: the ops of a record, in order (the first ``limit`` of them)."""
    shown = ops if limit is None else ops[:limit]
    text = ", ".join(f"{jn.OP_NAMES.get(op, f'op {op}')} {region}" for op, region in shown)
    if len(shown) < len(ops):
        text += f", ... ({len(ops)} ops)"
    return text


def record_json(r: jn.Record) -> dict[str, Any]:
    out: dict[str, Any] = {
        "position": r.lsn, "length": r.length, "end": r.end, "durable": r.durable, "kind": r.kind.name,
        "uuid": r.uuid if r.kind is not jn.Kind.SWITCH else None,
        "luid": r.luid if r.kind is not jn.Kind.SWITCH else None,
        "luid_hex": luid_hex(r.luid) if r.kind is not jn.Kind.SWITCH else None,
    }
    if r.kind in (jn.Kind.OPS, jn.Kind.FLUSH):
        out["ops"] = ops_text(r.ops, None)
        out["op_list"] = [[op, region] for op, region in r.ops]
    if r.kind is jn.Kind.FLUSH:
        out.update(generation=r.generation, cursor=r.cursor, committed_at=r.committed_at,
                   committed_at_iso=iso(r.committed_at))
    if r.kind is jn.Kind.EVENT:
        out.update(event=jn.Event(r.event).name, state=r.state, resumed=bool(r.flags & jn.FLAG_RESUMED),
                   superseded=bool(r.flags & jn.FLAG_SUPERSEDED), generation=r.generation,
                   region_count=r.region_count)
    if r.kind is jn.Kind.SWITCH:
        out["next_start"] = r.next_start
        out["next_segment"] = jn.segment_name(r.next_start)
    if r.kind is jn.Kind.AGREED:
        # The cluster journal's record: the luid field holds the epoch after the message.
        out.update(uuid=None, luid=None, luid_hex=None, agreed=cv.agreed_json(cv.decode_agreed(r)))
    return out


def record_text(r: jn.Record, labels: dict[str, str], snapshot: tuple[int, int] | None = None) -> list[str]:
    """``snapshot``: (id, epoch) of the cluster directory's snapshot, to say which AGREED
    records a restart replays onto it."""
    if r.kind is jn.Kind.AGREED:
        agreed = cv.decode_agreed(r)
        note = ""
        if snapshot is not None and agreed.message is not None:
            if agreed.snapshot_id != snapshot[0]:
                note = f"  [of snapshot {agreed.snapshot_id:016x}, not used]"
            elif agreed.epoch <= snapshot[1]:
                note = "  [in the snapshot]"
        return [f"  {r.lsn:>12}  {r.kind.name:<6}  {cv.agreed_text(agreed)}{note}"]
    who = "" if r.kind is jn.Kind.SWITCH else f"{labels.get(r.uuid, r.uuid)} {luid_hex(r.luid)}"
    if r.kind is jn.Kind.OPS:
        what = ops_text(r.ops)
    elif r.kind is jn.Kind.FLUSH:
        what = f"generation {r.generation}, cursor {r.cursor}" + (f"; {ops_text(r.ops)}" if r.ops else "")
    elif r.kind is jn.Kind.EVENT:
        flags = [n for bit, n in ((jn.FLAG_RESUMED, "resumed"), (jn.FLAG_SUPERSEDED, "superseded"))
                 if r.flags & bit]
        what = (f"{jn.Event(r.event).name} -> {r.state}{', ' + ', '.join(flags) if flags else ''}, "
                f"generation {r.generation}, {r.region_count} regions")
    else:
        what = f"continues in {jn.segment_name(r.next_start)}"
    return [f"  {r.lsn:>12}  {r.kind.name:<6}  {who + '  ' if who else ''}{what}".rstrip()]


def _instances_of(view: sv.StoreView) -> list[dict[str, Any]]:
    """Each instance of a store with its checkpoint and the records that follow it."""
    out = []
    for ev in view.envs:
        for s in ev.instances:
            j = s.journal
            out.append({
                "uuid": s.uuid, "dir": ev.name, "luid": s.luid, "luid_hex": luid_hex(s.luid),
                "layout": None if ev.format is None else ev.format.version,
                "checkpoint": None if j is None or j.checkpoint is None else j.checkpoint.position,
                "checkpoint_journal_id": None if j is None or j.checkpoint is None
                else j.checkpoint.journal_id.hex(),
                "records_after": 0 if j is None else j.records,
                "ops_replayed": 0 if j is None else len(j.ops),
                "damaged": None if j is None else j.damaged,
                "findings": [f.as_json() for f in s.findings],
            })
    return out


def cmd_journal(args: argparse.Namespace) -> int:
    if args.records < 0:
        raise ToolError("--records must be 0 or more")
    state_dir = state_dir_of(args)
    # The cluster journal (``DIR/cluster``): the same segments, of AGREED records.
    in_cluster = cv.is_cluster_dir(state_dir) and cv.cluster_dir(state_dir) is None
    if not in_cluster:
        check_state_dir(state_dir)
    boot_id = current_boot_id(args.boot_id)
    js = sv.read_journal_state(state_dir)
    if js.error:
        raise ToolError(f"{state_dir}: cannot read the journal: {js.error}")
    snapshot: tuple[int, int] | None = None
    snapshot_note = ""
    if in_cluster:
        view = sv.StoreView(state_dir, boot_id, daemon_status(state_dir.parent))
        try:
            found = read_snapshot_file(state_dir / cv.SNAPSHOT_FILE)
        except ClusterStoreError as exc:
            snapshot_note = "cluster snapshot: CANNOT BE READ (" + " ".join(str(exc).split()) + ")"
        else:
            snapshot = None if found is None else (found[1], found[2])
            snapshot_note = ("cluster snapshot: none (the records build on the empty state)" if found is None
                             else f"cluster snapshot {found[1]:016x} at epoch {found[2]}: a restart replays "
                                  "the records of this snapshot past its epoch")
    else:
        view = sv.read_store(state_dir, boot_id, moved_aside=False, journal=js)
    sc = js.scan
    insts = _instances_of(view)
    records = sc.records if args.all else sc.records[max(0, len(sc.records) - args.records):]
    segs = [{"file": jn.segment_name(start), "start": start, "base": h.base, "capacity": h.capacity,
             "end": start + h.capacity, "created_at": h.created_at, "created_at_iso": iso(h.created_at)}
            for start, h in sorted(sc.segments.items())]
    if args.json:
        emit_json(json_doc(
            TOOL, "journal", state_dir=str(state_dir), boot_id=boot_id, daemon=view.daemon.as_json(),
            exists=sc.exists, journal_id=None if sc.journal_id is None else sc.journal_id.hex(),
            segments=segs, base=sc.base, end=sc.end, durable=sc.durable,
            damage=[{"start": d.start, "end": d.end, "reason": d.reason} for d in sc.damage],
            problems=list(sc.problems), findings=[f.as_json() for f in js.findings],
            instances=insts, records_total=len(sc.records), records_shown=len(records),
            records=[record_json(r) for r in records],
            cluster=in_cluster, cluster_snapshot=None if snapshot is None else {
                "id": snapshot[0], "id_hex": f"{snapshot[0]:016x}", "epoch": snapshot[1]}))
        return EXIT_OK
    where = f"cluster journal {state_dir}" if in_cluster else f"state dir {state_dir}"
    out = [f"{where}: {view.daemon.describe()}; this boot {boot_id}", journal_summary(js)]
    if snapshot_note:
        out.append(snapshot_note)
    if segs:
        rows = [[g["file"], str(g["start"]), str(g["base"]), str(g["capacity"]), when(g["created_at"])]
                for g in segs]
        out.append("")
        out.extend(table(rows, ["segment", "start", "base", "capacity", "created"], right={1, 2, 3},
                         indent="  "))
    for d in sc.damage:
        out.append(f"  DAMAGE {d.start}-{d.end}: {d.reason}")
    for p in sc.problems:
        out.append(f"  problem: {p}")
    if insts:
        out.append("")
        out.append("instances (checkpoint: every record of the instance before it is in its store):")
        rows = []
        for i in insts:
            ck = "-" if i["checkpoint"] is None else str(i["checkpoint"])
            other = i["checkpoint_journal_id"]
            if other and other != (sc.journal_id.hex() if sc.journal_id else None):
                ck += f" (journal {i['checkpoint_journal_id'][:12]})"
            elif i["layout"] is not None and i["layout"] < 3:
                ck = f"- (layout {i['layout']}: migrated at the daemon's next start)"
            rows.append([i["uuid"], i["luid_hex"], ck, str(i["records_after"]), str(i["ops_replayed"]),
                         i["damaged"] or ""])
        out.extend(table(rows, ["uuid", "luid", "checkpoint", "records after", "ops replayed", "damaged"],
                         right={3, 4}, indent="  "))
    out.append("")
    if not sc.records:
        out.append("no records")
    else:
        labels: dict[str, str] = {}
        for r in sc.records:
            if r.kind not in (jn.Kind.SWITCH, jn.Kind.AGREED) and r.uuid not in labels:
                labels[r.uuid] = f"u{len(labels) + 1}"
        which = "all" if len(records) == len(sc.records) else f"the last {len(records)}"
        columns = ("position, kind, the epoch after it, sender node, message" if in_cluster
                   else "position, kind, uuid label, luid, what")
        out.append(f"records ({which} of {len(sc.records)}; {columns}):")
        for u, label in labels.items():
            out.append(f"  {label} = uuid {u!r}")
        for r in records:
            out.extend(record_text(r, labels, snapshot))
    print("\n".join(out))
    return EXIT_OK


# --- wire ----------------------------------------------------------------------------------------


def cmd_wire(args: argparse.Namespace) -> int:
    try:
        data, is_hex = wd.read_source(args.file)
    except OSError as exc:
        raise ToolError(os_error_text(exc) if exc.filename else f"{args.file}: {exc.strerror}") from None
    try:
        if is_hex:
            decoded = wd.from_hex(data.decode("ascii", errors="replace"), "-")
        elif data.startswith(capture.MAGIC):
            decoded = wd.from_capture(data, args.file)
        else:
            text = data.decode("ascii", errors="replace")
            if text.strip() and all(c in "0123456789abcdefABCDEFxXreqpl:= \t\r\n" for c in text):
                decoded = wd.from_hex(text, args.file)
            else:
                raise ToolError(f"{args.file}: not a capture (no ULOGCAP1 magic) and not hex frames")
    except capture.CaptureFormatError as exc:
        raise ToolError(f"{args.file}: {exc}") from None
    frames = wd.filter_frames(decoded.frames, args.uuid, args.luid)
    summ = wd.summary(decoded)
    if args.json:
        emit_json(json_doc(TOOL, "wire", source=args.file, summary=summ,
                           records=[wd.frame_json(f, decoded.start_ns) for f in frames]))
        return EXIT_OK
    uuids: dict[str, str] = {}
    for f in decoded.frames:
        if f.uuid is not None and f.uuid not in uuids:
            uuids[f.uuid] = f"u{len(uuids) + 1}"
    rows = []
    for f in frames:
        t = "" if f.time_ns is None or decoded.start_ns is None else \
            f"{(f.time_ns - decoded.start_ns) / 1e9:.6f}"
        peer = "" if f.peer is None else f"#{f.peer}"
        latency = "" if f.latency_ns is None else f"{f.latency_ns / 1e6:.3f} ms"
        rows.append([
            f"#{f.index}", t, ">" if f.direction == "request" else "<",
            "" if f.seq is None else str(f.seq), f.type_name,
            "" if f.luid is None else f"{f.luid:#x}", uuids.get(f.uuid or "", "") if f.uuid else "",
            wd.result_text(f) or ("(no reply)" if f.direction == "request" and f.peer is None else ""),
            peer, latency, wd.describe_payload(f),
        ])
    src = "stdin" if args.file == "-" else args.file
    head = f"{src}: {summ['records']} record(s), {summ['requests']} request(s), {summ['replies']} reply(ies)"
    transports = sorted({f.transport for f in decoded.frames if f.transport})
    if transports:
        head += f" ({', '.join(transports)})"
    if summ["duration_s"] is not None:
        head += f" over {summ['duration_s']:.3f} s"
    print(head)
    for u, label in uuids.items():
        print(f"  {label} = uuid {u!r}")
    print("  '>' kernel -> daemon (request), '<' daemon -> kernel (reply); 'pair' is the other half, "
          "matched by seq (cn_msg.seq for ACK-form replies)")
    print()
    for line in table(rows, ["#", "t (s)", "dir", "seq", "type", "luid", "uuid", "result", "pair", "latency",
                             "payload"], right={1, 3, 9}):
        print(line)
    print()
    lat = summ["latency_ms"]
    print(f"unanswered requests: {len(summ['unanswered'])}"
          + (f" ({', '.join('#' + str(i) for i in summ['unanswered'][:20])})" if summ["unanswered"] else "")
          + f"; replies without a request: {len(summ['unmatched_replies'])}; "
          f"error replies: {summ['errors']}; malformed frames: {summ['malformed']}")
    if lat:
        print(f"reply latency: min {lat['min']:.3f} ms, median {lat['median']:.3f} ms, "
              f"max {lat['max']:.3f} ms")
    if decoded.truncated:
        print(f"TRUNCATED: {decoded.truncated}")
    return EXIT_OK


# --- disklog -------------------------------------------------------------------------------------


def disklog_json(info: disklog.DiskLogInfo, target: disklog.Target) -> dict[str, Any]:
    clean = info.clean
    return {
        "path": target.path, "block_device": target.is_block, "size": info.size,
        "logical_block_size": target.block_size,
        "magic": info.magic, "magic_ok": info.magic_ok if info.magic is not None else None,
        "log_version": info.version, "nr_regions": info.nr_regions,
        "verdict": info.kind, "valid": info.valid, "reason": info.reason,
        "region_count": info.region_count,
        "bitset_bytes": None if info.region_count is None else disklog.bitset_bytes(info.region_count),
        "clean": None if clean is None else clean.count(1),
        "not_clean": None if clean is None else clean.count(0),
        "clean_ranges": None if clean is None else bit_ranges(clean, 1),
        "not_clean_ranges": None if clean is None else bit_ranges(clean, 0),
        "notes": info.notes,
    }


def cmd_disklog(args: argparse.Namespace) -> int:
    if args.region_count is not None and args.region_count < 1:
        raise ToolError("--region-count must be at least 1")
    try:
        info, target = disklog.read(args.path, args.region_count)
    except OSError as exc:
        raise ToolError(f"{args.path}: {exc.strerror or exc}") from None
    except disklog.DiskLogError as exc:
        raise ToolError(f"{args.path}: {exc}") from None
    if args.json:
        emit_json(json_doc(TOOL, "disklog", **disklog_json(info, target)))
        return EXIT_OK
    kind = "block device" if target.is_block else "file"
    rows: list[tuple[str, str]] = []
    if info.magic is not None:
        ok = "ok ('MiRr')" if info.magic_ok else f"BAD (expected {disklog.MIRROR_MAGIC:#010x})"
        rows.append(("magic", f"{info.magic:#010x}  {ok}"))
        rows.append(("version", f"{info.version}"))
        nr = info.nr_regions
        rows.append(("nr_regions", f"{nr}" + ("  (2^64-1: LVM's fresh-log marker)"
                                             if nr == disklog.LVM_FRESH_NR_REGIONS else "")))
    if info.clean is not None and info.region_count is not None:
        n = info.region_count
        rows.append(("bitset", f"{disklog.bitset_bytes(n)} bytes at offset {disklog.LOG_OFFSET} "
                     f"({n} regions, rounded up to 32 bits)"))
        rows.append(("clean", f"{info.clean.count(1)}/{n}  {bit_ranges(info.clean, 1) or 'none'}"))
        rows.append(("not clean", f"{info.clean.count(0)}/{n}  {bit_ranges(info.clean, 0) or 'none'}"))
    rows.append(("verdict", ("VALID" if info.valid else "INVALID") + f": {info.reason}"))
    for note in info.notes:
        rows.append(("note", note))
    width = max(len(k) for k, _ in rows)
    print(f"disk log {target.path} ({kind}, {info.size} bytes"
          + (f", logical block {target.block_size}" if target.is_block else "") + ")")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return EXIT_OK


# --- the command line ----------------------------------------------------------------------------


def _json_option(p: argparse.ArgumentParser) -> None:
    """--json, which every command takes (last in its options)."""
    p.add_argument("--json", action="store_true", help="JSON instead of text")


def build_parser() -> argparse.ArgumentParser:
    p, commands = tool_parser(
        TOOL, __version__,
        description=("Decode what ulog-disk and the kernel keep, without changing anything: the daemon's "
                    "LMDB store and journal, a capture of the frames it exchanged with the kernel, and the "
                    "kernel's own 'disk' dirty log. Reading a store never blocks or disturbs a running "
                    "dm-ulogd (LMDB read-only transactions)."),
        epilog="Run 'ulog-dump COMMAND --help' for each. Every command takes --json (keys documented in\n"
               "formats/tools-json.md and formats/disklog.md).\n\n"
               "exit status: 0 decoded; 2 could not read (bad arguments, not a ulog-disk state directory,\n"
               "no such file, I/O error), with one line 'ulog-dump: what is wrong' on stderr.\n",
    )

    s = commands.add(
        "store", cmd_store,
        help="every uuid, instance, verdict, generation, geometry, counts and region ranges",
        description=("Show every uuid's store: each instance (luid) with its lifecycle state, verdict "
                    "(live, presuspended, suspended, constructed, orphaned, superseded, damaged), "
                    "generation, constructor and geometry, counts (regions, in sync, dirty), the "
                    "out-of-sync and dirty regions as ranges (0-17,42,100-199), boot id, last commit "
                    "and its journal; then the uuid's retained state. The state shown is what a restart "
                    "of the daemon would restore: the last commit, plus the journal's ops when the "
                    "instance is of this boot. Stores the daemon moved aside as damaged "
                    "(<dir>.damaged-<time>) are shown too."),
        epilog="examples:\n"
               "  ulog-dump store                                  # /var/lib/ulog-disk\n"
               "  ulog-dump store --state-dir /srv/state --uuid LVM-abc --per-region\n"
               "  ulog-dump store /var/lib/ulog-disk/u.LVM-abc     # one store directory\n"
               "  ulog-dump store --luid 0xffff88812a4bc000 --json\n\n"
               "--per-region draws every region: " + GRID_LEGEND + ".\n",
    )
    add_state_dir_option(s, positional="STATE_DIR|UUID_DIR",
                         positional_help="the state directory, as with --state-dir, or one store directory "
                                         "in it (u.UUID)")
    s.add_argument("--uuid", action="append", metavar="UUID", help="only this uuid (repeatable)")
    s.add_argument("--luid", type=parse_luid, metavar="LUID", help="only the instance with this luid (hex)")
    s.add_argument("--per-region", action="store_true",
                   help="every region's state (a grid; in JSON a list)")
    # The earlier spelling, kept for scripts but hidden: --regions is a list of regions (resync).
    s.add_argument("--regions", dest="per_region", action="store_true", help=argparse.SUPPRESS)
    add_store_options(s, state_dir=False)
    _json_option(s)

    j = commands.add(
        "journal", cmd_journal,
        help="the daemon-wide journal: segments, end, durable point, damage, records",
        description=(
                    "Decode the journal of a state directory (formats/journal.md), read-only: its segments "
                    "(file, start, base, capacity, created), the journal id, where it ends, the position it "
                    "was durable up to at least (the highest durable claim of a record), damaged ranges "
                    "(a record that fails while a later one says the journal was durable past it) and "
                    "segments that could not be used; each instance's checkpoint (read from its store, "
                    "read-only) and how many of its records follow it, which is what the daemon's next "
                    "start replays; and the records: position, kind (OPS, FLUSH, EVENT, SWITCH), uuid, "
                    "luid, ops as text (mark 5, clear 7, in-sync 9, out-of-sync 12), a FLUSH's generation, "
                    "an EVENT's request and lifecycle state. Given the cluster directory of a state "
                    "directory (DIR/cluster, dm-ulogd --cluster), it decodes the cluster journal: its AGREED "
                    "records, each one cluster message this node applied, with the epoch after it, the "
                    "sender's node id, the message's kind (FLUSH, RESYNC_WORK, SET_REGION_SYNC, OPEN, "
                    "CLOSE, DEPARTED, FENCED, REBOOTED) and fields, and whether a restart replays it onto "
                    "the snapshot."),
        epilog="examples:\n"
               "  ulog-dump journal                      # /var/lib/ulog-disk, the last 50 records\n"
               "  ulog-dump journal /srv/state --all\n"
               "  ulog-dump journal /srv/state/cluster   # the cluster journal\n"
               "  ulog-dump journal --state-dir /srv/state --records 5 --json\n",
    )
    add_state_dir_option(j, positional="STATE_DIR")
    j.add_argument("--records", type=int, default=50, metavar="N",
                   help="show the last N records (default 50; 0 for none)")
    j.add_argument("--all", action="store_true", help="show every record")
    add_store_options(j, state_dir=False)
    _json_option(j)

    cl = commands.add(
        "cluster", cmd_cluster,
        help="the cluster state (dm-ulogd --cluster): epoch, snapshot, members' marks, held regions",
        description=(
                    "Show the cluster state a state directory keeps in cluster/ when dm-ulogd runs with "
                    "--cluster: the state its restart would load (the snapshot, plus the AGREED records of "
                    "the cluster journal after it, replayed in order), read-only. Its generation (the epoch: "
                    "how far along the one agreed history it is; the snapshot's id and epoch; how many "
                    "records follow it), the departed nodes waiting for a fence; per clustered log (uuid): "
                    "regions and how many are in sync, the out-of-sync regions, the nodes that have it open "
                    "(node id, luid, boot id), each node's marked regions (count and ranges), the regions "
                    "held for an unfenced departed node, the released regions (a departed node's, or a "
                    "node's earlier writes, to be recovered by anyone), which node recovers which region, "
                    "each node's resync cursor; and what is wrong with it (the checks of 'ulog-recover "
                    "verify'). The other members hold the same state at their own epoch: this is this "
                    "node's copy."),
        epilog="examples:\n"
               "  ulog-dump cluster                              # /var/lib/ulog-disk/cluster\n"
               "  ulog-dump cluster /srv/state --uuid LVM-abc --json\n"
               "  ulog-dump journal /srv/state/cluster           # its AGREED records\n",
    )
    add_state_dir_option(cl, positional="STATE_DIR|CLUSTER_DIR",
                         positional_help="the state directory, as with --state-dir, or its cluster directory")
    cl.add_argument("--uuid", action="append", metavar="UUID", help="only this clustered log (repeatable)")
    _json_option(cl)

    w = commands.add(
        "wire", cmd_wire,
        help="one line per request and reply of a capture (dm-ulogd --capture) or hex frames",
        description=(
                    "Decode a capture file written by 'dm-ulogd --capture FILE' (formats/capture.md): one "
                    "line per request (>) and reply (<) with the time since the first record, seq, "
                    "request type, luid, uuid, the reply's result (ok or -ERRNO), the index of the other "
                    "half of the pair, the reply latency, and the decoded payload (regions as ranges, "
                    "counts, constructor strings, status text). Replies are paired with their request by "
                    "seq (an ACK-form reply by cn_msg.seq). A truncated last record (the daemon was "
                    "killed while writing it) is reported at the end; the records before it are shown."),
        epilog="examples:\n"
               "  ulog-dump wire /tmp/frames.cap\n"
               "  ulog-dump wire /tmp/frames.cap --uuid LVM-abc --json\n"
               "  echo 07000000010000... | ulog-dump wire -\n\n"
               "Hex input (FILE '-' for stdin, or a text file of hex): one frame per whitespace-separated\n"
               "token, a connector payload (cn_msg + header + data) or a whole netlink datagram; prefix a\n"
               "token with 'req:' or 'rep:' to give its direction (default: request, or reply for an\n"
               "ACK-form frame). Hex frames carry no time, so no timing is shown for them.\n",
    )
    w.add_argument("file", metavar="FILE|-", help="capture file, or - for hex frames on stdin")
    w.add_argument("--uuid", metavar="UUID", help="only frames of this uuid")
    w.add_argument("--luid", type=parse_luid, metavar="LUID", help="only frames of this luid (hex)")
    _json_option(w)

    d = commands.add(
        "disklog", cmd_disklog,
        help="header and clean bits of an in-kernel 'disk' log (file or device)",
        description=(
                    "Decode the kernel's 'disk' dirty log (dm-log.c; the log device of a 'mirror ... disk' "
                    "table or an LVM mirror log): magic, version, nr_regions, the clean bits as ranges, "
                    "and a verdict: valid, or invalid and why (bad magic, unknown version, file too small "
                    "for nr_regions), with what the kernel does with it at the next resume. LVM's fresh-log "
                    "marker (nr_regions = 2^64-1) is explained; give --region-count to see its bits. Layout: "
                    "formats/disklog.md."),
        epilog="examples:\n"
               "  ulog-dump disklog /dev/vg/lv_mlog\n"
               "  ulog-dump disklog exported.log --json\n"
               "  ulog-dump disklog /dev/mapper/vg-lv_mlog --region-count 2048\n",
    )
    d.add_argument("path", metavar="DEVICE|FILE", help="log device or file")
    add_region_count_option(d, help="read the bits for N regions instead of the header's nr_regions")
    _json_option(d)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_tool(TOOL, build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
