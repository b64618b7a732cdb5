#!/bin/bash
# A mirror's log moves from dm-ulogd to the kernel's own 'disk' log and back, without a full resync:
#  1. a userspace-log mirror is fully resynced by dm-ulogd, then removed (its state retained);
#  2. `ulog-recover export` writes that state as a disk log on a loop device; the kernel accepts the
#     header (create succeeds) and the mirror is n/n in sync at once, no resync;
#  3. `ulog-recover resync --regions` marks 4 regions out of sync, they are scribbled on leg 1, and the
#     state is exported straight onto a loop device and loaded again, with leg 1 behind a suspended
#     linear device so no recovery can finish (an export onto the log device in use is refused):
#     the kernel's sync count starts at n - 4 and stays there; then leg 1 resumes, the 4 regions are
#     copied and the legs are identical;
#  4. LVM's fresh-log marker (nr_regions = 2^64-1 over zeroed bits) is loaded the same way: 0/n, as
#     `ulog-dump disklog` explains;
#  5. `ulog-recover import` reads the kernel's disk log back into the store, and dm-ulogd serves the
#     mirror again with nothing to resync.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

DLX_LOOPS=()   # loop devices over exported log files
DLX_LINEAR=()  # linear devices over the legs (suspended ones are resumed at clean-up)

recover() { "$PY" -m ulog_disk.tools.recover "$@"; }
ulog_dump() { "$PY" -m ulog_disk.tools.dump "$@"; }

# json FILE KEY: a top-level scalar of the tools' JSON (indented 2, one key per line; no python start-up,
# which costs seconds under emulation).
json() { sed -n -e "s/^  \"$2\": \"\(.*\)\",\{0,1\}\$/\1/p" -e "s/^  \"$2\": \([^\",]*\),\{0,1\}\$/\1/p" "$1"; }

# loop_file FILE: a loop device over FILE (printed).
loop_file() {
    local dev
    dev=$(losetup -f --show "$1") || die "losetup $1 failed"
    DLX_LOOPS+=("$dev")
    echo "$dev"
}

# disk_table LOGDEV LEG0 LEG1: the in-kernel disk-log mirror of the standard geometry (default sync mode,
# so the kernel keeps the stored bits).
disk_table() { echo "0 $MIRROR_SECTORS mirror disk 2 $1 $MIRROR_REGION 2 $2 0 $3 0"; }

# make_linear NAME DEV: a linear device over the whole of DEV.
make_linear() {
    timeout 30 dmsetup --noudevsync create "$1" --table "0 $(sectors "$2") linear $2 0" || die "linear $1 failed"
    dmsetup mknodes "$1"
    DLX_LINEAR+=("$1")
}

# dump_disklog KEY DEV [text]: the disk log's JSON, saved as $SOUT/KEY.json (and with 'text' its text
# form in the scenario log).
dump_disklog() {
    blockdev --flushbufs "$2" 2>/dev/null
    ulog_dump disklog "$2" --json >"$SOUT/$1.json" || fail "ulog-dump disklog $2 failed"
    [ "${3:-}" = text ] && ulog_dump disklog "$2" | sed "s/^/[$1] /"
    return 0
}

# scribble_leg1 REGION COUNT: overwrite COUNT regions of leg 1 from REGION with random data.
scribble_leg1() {
    dd if=/dev/urandom of="${LEGS[1]}" bs=$((MIRROR_REGION * 512)) seek="$1" count="$2" oflag=direct \
        conv=notrunc status=none || fail "cannot write leg 1"
}

dlx_cleanup() {
    local n
    for n in "${DLX_LINEAR[@]}"; do timeout 30 dmsetup resume "$n" >/dev/null 2>&1; done
    for n in "${MIRRORS[@]}"; do timeout 30 dmsetup --noudevsync remove --force "$n" >/dev/null 2>&1; done
    MIRRORS=()
    for n in "${DLX_LINEAR[@]}"; do timeout 30 dmsetup --noudevsync remove --force "$n" >/dev/null 2>&1; done
    for n in "${DLX_LOOPS[@]}"; do losetup -d "$n" 2>/dev/null; done
    cleanup
}

scenario_disklog_export() {
    local name=ulog-dlx uuid=ulogvm-disklog-export kname=ulog-dlx-k log1 log2 log3 before
    trap dlx_cleanup EXIT

    # 1. dm-ulogd resyncs the mirror fully; removing it leaves the state as the uuid's retained state.
    setup_mirror "$name" "$uuid" clustered-core
    remove_mirror "$name"
    stop_daemon
    recover verify --state-dir "$STATE" >"$SOUT/verify.txt"
    check "verify_rc" "$?" 0

    # 2. Export it: every region clean and in sync, so the kernel starts n/n without a resync.
    recover export "$uuid" --disklog "$WORK/clean.log" --state-dir "$STATE" --json >"$SOUT/export-clean.json"
    check "export_clean_rc" "$?" 0
    check "export_clean_regions" "$(json "$SOUT/export-clean.json" clean)" "$MIRROR_REGIONS"
    check "export_clean_bytes" "$(stat -c %s "$WORK/clean.log")" 1536
    log1=$(loop_file "$WORK/clean.log")
    dump_disklog disklog-clean "$log1"
    check "disklog_clean_verdict" "$(json "$SOUT/disklog-clean.json" verdict)" valid
    create_mirror "$kname" "$(disk_table "$log1" "${LEGS[0]}" "${LEGS[1]}")"
    check "kernel_accepts_clean_export" "$(sync_field "$kname")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    wait_recovered "$kname"
    check_re "status_clean_export" "$(dm_status "$kname")" \
        "0 $MIRROR_SECTORS mirror 2 $(devno "${LEGS[0]}") $(devno "${LEGS[1]}") $MIRROR_REGIONS/$MIRROR_REGIONS 1 AA 3 disk $(devno "$log1") A"
    check "table_clean_export" "$(dm_table "$kname")" \
        "0 $MIRROR_SECTORS mirror disk 2 $(devno "$log1") $MIRROR_REGION 2 $(devno "${LEGS[0]}") 0 $(devno "${LEGS[1]}") 0"
    remove_mirror "$kname"
    dump_disklog disklog-clean-after "$log1"
    check "kernel_rewrote_clean" "$(json "$SOUT/disklog-clean-after.json" clean)/$(json "$SOUT/disklog-clean-after.json" nr_regions)" \
        "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "legs_after_clean_export" "$(cmp_legs)" equal

    # 3. Mark regions 3 and 10-12 out of sync in the store, make the legs differ there, export, and load
    #    it with leg 1 suspended: the sync count must start (and stay) at n - 4.
    recover resync "$uuid" --regions 3,10-12 --state-dir "$STATE" --yes >"$SOUT/resync.txt"
    check "resync_rc" "$?" 0
    # This time straight onto a block device (a zeroed 1 MiB loop device).
    dd if=/dev/zero of="$WORK/dirty.img" bs=1M count=1 status=none
    log2=$(loop_file "$WORK/dirty.img")
    recover export "$uuid" --disklog "$log2" --state-dir "$STATE" --json >"$SOUT/export-dirty.json"
    check "export_dirty_rc" "$?" 0
    check "export_dirty_block_device" "$(json "$SOUT/export-dirty.json" block_device)" true
    check "export_dirty_not_clean" "$(json "$SOUT/export-dirty.json" not_clean_ranges)" "3,10-12"
    scribble_leg1 3 1
    scribble_leg1 10 3
    check "diff_regions_before" "$(count_diff_regions "$MIRROR_REGION")" 4
    dump_disklog disklog-dirty "$log2" text
    make_linear ulog-dlx-l0 "${LEGS[0]}"
    make_linear ulog-dlx-l1 "${LEGS[1]}"
    timeout 30 dmsetup suspend ulog-dlx-l1
    check "leg1_suspended_rc" "$?" 0
    create_mirror "$kname" "$(disk_table "$log2" /dev/mapper/ulog-dlx-l0 /dev/mapper/ulog-dlx-l1)"
    check "kernel_sync_dirty_export" "$(sync_field "$kname")" "$((MIRROR_REGIONS - 4))/$MIRROR_REGIONS"
    # The log device is now held by the mirror: an export onto it is refused (exclusive open).
    recover export "$uuid" --disklog "$log2" --state-dir "$STATE" >"$SOUT/export-busy.txt" 2>&1
    check "export_onto_busy_log_rc" "$?" 1
    check "export_onto_busy_log_says" "$(grep -c 'is in use' "$SOUT/export-busy.txt")" 1
    check "kernel_sync_dirty_export_held" "$(sync_field "$kname")" "$((MIRROR_REGIONS - 4))/$MIRROR_REGIONS"
    timeout 30 dmsetup resume ulog-dlx-l1
    check "leg1_resumed_rc" "$?" 0
    wait_sync "$kname" 120
    check "legs_after_dirty_export" "$(cmp_legs)" equal
    remove_mirror "$kname"
    dump_disklog disklog-dirty-after "$log2"
    check "kernel_log_after_recovery" "$(json "$SOUT/disklog-dirty-after.json" clean)" "$MIRROR_REGIONS"

    # 4. LVM's fresh-log marker: a valid header naming no region count, zero bits: everything resynced.
    "$PY" - "$WORK/lvm.log" <<'PYEOF'
import sys
from ulog_disk.storage import disklog
hdr = disklog.DiskLogHeader.build(dict(magic=disklog.MIRROR_MAGIC, version=2, nr_regions=disklog.LVM_FRESH_NR_REGIONS))
open(sys.argv[1], "wb").write(hdr.ljust(4096, b"\0"))
PYEOF
    log3=$(loop_file "$WORK/lvm.log")
    dump_disklog disklog-lvm "$log3" text
    check "disklog_lvm_verdict" "$(json "$SOUT/disklog-lvm.json" verdict)" lvm-fresh
    timeout 30 dmsetup suspend ulog-dlx-l1
    create_mirror "$kname" "$(disk_table "$log3" /dev/mapper/ulog-dlx-l0 /dev/mapper/ulog-dlx-l1)"
    check "kernel_sync_lvm_marker" "$(sync_field "$kname")" "0/$MIRROR_REGIONS"
    timeout 30 dmsetup resume ulog-dlx-l1
    wait_sync "$kname" 180
    remove_mirror "$kname"
    dump_disklog disklog-lvm-after "$log3"
    check "kernel_rewrote_lvm_marker" "$(json "$SOUT/disklog-lvm-after.json" nr_regions)" "$MIRROR_REGIONS"
    for n in ulog-dlx-l0 ulog-dlx-l1; do timeout 30 dmsetup --noudevsync remove "$n"; done
    DLX_LINEAR=()
    check "kernel_header_errors" "$(scen_dmesg | grep -c -e 'incompatible disk log' -e 'Failed to read header')" 0

    # 5. Back to dm-ulogd: import the kernel's log (all clean after its recovery); nothing is resynced.
    recover import "$uuid" --disklog "$log2" --state-dir "$STATE" --yes --json >"$SOUT/import.json"
    check "import_rc" "$?" 0
    recover list --state-dir "$STATE" | sed 's/^/[list] /'
    start_daemon
    before=$(resync_count)
    create_mirror "$name" "$MIRROR_TABLE"
    check "sync_after_import" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    wait_recovered "$name"
    check "resync_after_import" "$(($(resync_count) - before))" 0
    check_status_table "$name" "$uuid" clustered-core
    check "legs_final" "$(cmp_legs)" equal
    remove_mirror "$name"
    stop_daemon
}

main_scenario disklog-export
