#!/bin/bash
# A host crash under a live mirror, and the boot after it, on the same virtual disks.
#
# Boot 1: the daemon's state directory on its own ext4 disk (`state`), the mirror's legs on two
# other disks (`leg0`, `leg1`; leg 1 through a dm-delay device), 512 regions of 64 KiB; full initial
# resync; then leg 1's writes are delayed (CRASH_DELAY_MS, default 2000), writers put O_DIRECT writes
# in flight at spread-out places (each 256 KiB = 4 regions) and the guest kernel is crashed (sysrq
# c): nothing is flushed, qemu ends, and what was in flight to leg 1 is lost, so the legs differ.
# Boot 2: the state disk is mounted again (ext4 journal replay), the legs are compared region by
# region (what the crash left different), the store is read (lmdb), dm-ulogd is started on it and the
# mirror created again with the same table and uuid (the kernel gives it a new luid). With lmdb only
# the regions dirty at the crash must resync; with `--env BACKEND=memory` (the control, like
# cmirrord) every region does. Either way the legs must end identical.
#
#   python3 tools/vm/ulogvm.py run host-crash                       # lmdb
#   python3 tools/vm/ulogvm.py run host-crash --env BACKEND=memory  # the control
#
# Result keys (host-crash.*): boot1_* before the crash, boot2_* after it; boot2_resynced is the
# number of regions resynced on boot 2 (daemon log), boot2_regions the mirror's region count.
# Variables: CRASH_WRITERS (parallel writers, default 3), CRASH_AFTER (seconds of writes, default 6).
#
# ulogvm-run: --boots 2 --disk state:64M --disk leg0:32M --disk leg1:32M
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

HC_NAME=ulog-crash
HC_UUID=ulogvm-host-crash
HC_SECTORS=65536  # 32 MiB legs
HC_REGION=128     # 64 KiB regions
HC_REGIONS=512
HC_MNT=$WORK/statedisk
HC_SLOW=ulog-slowleg  # dm-delay over leg 1 (no delay but in boot 1 just before the crash)
HC_TABLE=

# hc_disks: find the run's disks, put leg 1 behind $HC_SLOW (the first dm device of the boot, so the
# mirror's table is the same in both boots); sets STATE_DEV, LEGS, LEG1_DEV, STATE and HC_TABLE.
hc_disks() {
    local leg0
    STATE_DEV=$(disk_dev state) || die "no disk 'state' (ulogvm.py run host-crash declares its disks)"
    leg0=$(disk_dev leg0) || die "no disk 'leg0'"
    LEG1_DEV=$(disk_dev leg1) || die "no disk 'leg1'"
    [ "$(sectors "$leg0")" -ge "$HC_SECTORS" ] || die "leg0 smaller than $HC_SECTORS sectors"
    timeout 60 dmsetup --noudevsync create "$HC_SLOW" --table "0 $HC_SECTORS delay $LEG1_DEV 0 0" \
        || die "cannot create $HC_SLOW"
    dmsetup mknodes "$HC_SLOW"
    LEGS=("$leg0" "/dev/mapper/$HC_SLOW")
    STATE=$HC_MNT/state
    HC_TABLE=$(mirror_table "$HC_SECTORS" "$HC_UUID" clustered-core "$HC_REGION")
    log "state disk $STATE_DEV, legs ${LEGS[*]} (over $LEG1_DEV)"
}

# slow_leg MS: delay leg 1's writes by MS milliseconds from now on (reads are not delayed).
slow_leg() {
    timeout 60 dmsetup reload "$HC_SLOW" --table "0 $HC_SECTORS delay $LEG1_DEV 0 0 $LEG1_DEV 0 $1" &&
        timeout 60 dmsetup suspend "$HC_SLOW" && timeout 60 dmsetup resume "$HC_SLOW" ||
        die "cannot slow down leg 1"
}

# spread_writers N: N background loops of O_DIRECT writes through the mirror, one 256 KiB write (4
# regions, split by the mirror into 4 bios in flight at once) at a random region per round, until
# the crash; each logs "start R" and "done R" for its writes. Writer i keeps to its own 1/N of the
# mirror: two writes in flight to the same sectors may land in a different order on each leg (the
# mirror does not order them), which would make the legs differ with no crash at all.
spread_writers() {
    local i
    for ((i = 0; i < $1; i++)); do
        (
            slice=$((HC_REGIONS / $1))
            base=$((i * slice))
            while :; do
                r=$((base + (RANDOM * 32768 + RANDOM) % (slice - 3)))
                echo "start $r"
                dd if=/dev/urandom of="/dev/mapper/$HC_NAME" bs=256K count=1 seek=$((r * HC_REGION * 512)) \
                    oflag=direct,seek_bytes conv=notrunc status=none || echo "write failed at region $r"
                echo "done $r"
            done
        ) >"$SOUT/writer$i.log" 2>&1 &
    done
}

# leg_diff: "COUNT RANGES" of the regions in which the legs differ (read without the mirror).
leg_diff() { diff_regions "$((HC_REGION * 512))" "$HC_REGIONS"; }

# store_view: "DIRTY OUT_OF_SYNC DIRTY_RANGES OUT_OF_SYNC_RANGES" of the uuid's instances in the
# store, read-only with ulog-dump (what the crash left; "n/a" if it cannot be read).
store_view() {
    "$PY" -m ulog_disk.tools.dump store "$STATE" --uuid "$HC_UUID" --json 2>>"$SOUT/dump.log" | "$PY" -c '
import json, sys
try:
    states = [s for st in json.load(sys.stdin)["stores"] for s in st["instances"]]
except Exception:
    states = []
if not states:
    print("n/a n/a n/a n/a")
else:
    s = states[-1]
    print(s["dirty"], s["region_count"] - s["in_sync"], s["dirty_ranges"] or "none",
          s["out_of_sync_ranges"] or "none")'
}

# expand_ranges RANGES: one region per line from "1,4-6" ("none": nothing).
expand_ranges() {
    local part
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        [ "$part" = none ] && continue
        seq "${part%-*}" "${part#*-}"
    done
}

# to_ranges: sorted region numbers, one a line -> "1,4-6" ("none" if there are none).
to_ranges() {
    awk 'NR == 1 { s = e = $1; next }
         $1 == e + 1 { e = $1; next }
         { out = out (out == "" ? "" : ",") (s == e ? s : s "-" e); s = e = $1 }
         END { if (NR) out = out (out == "" ? "" : ",") (s == e ? s : s "-" e); print (NR ? out : "none") }'
}

# in_flight_at_crash: the regions of the writes boot 1's writers had started and not seen done.
in_flight_at_crash() {
    cat "$SOUT"/writer*.log | awk '$1 == "start" { s[$2] = 1 } $1 == "done" { delete s[$2] }
        END { for (r in s) for (i = 0; i < 4; i++) print r + i }' | sort -n -u
}

# boot2_resynced_regions: the regions the daemon handed out for resync since its start on boot 2.
boot2_resynced_regions() {
    sed -n '/^=== start 2 /,$p' "$SOUT/daemon.log" | sed -n 's/.* resync region \([0-9]*\)$/\1/p' | sort -n -u
}

# writes_in_flight: wait (at most 10 s) until the slowed leg holds writes, then record how many.
# The mirror's own in-flight count is not enough: a write it has queued waits for its region's mark
# to be flushed by the daemon before it goes to either leg, and a crash then leaves the legs equal.
# dm-delay's status counts the writes it holds (its device's inflight file does not): once it holds
# one, the mirror has sent that write to both legs; leg 0's half lands within milliseconds, leg 1's
# is held CRASH_DELAY_MS, so the crash a moment later leaves them different. The hold is long (2 s)
# against the 0.1-0.3 s from seeing the writes held to the crash: with 400 ms, the writes seen had
# sometimes been held long enough to complete on both legs before the crash (CI, once: 12 held,
# then every region clean and the legs equal).
writes_in_flight() {
    local i writes=0 status
    for ((i = 0; i < 200; i++)); do
        read -r -a status <<<"$(timeout 5 dmsetup status "$HC_SLOW" 2>/dev/null)"
        writes=${status[4]:-0}
        [ "$writes" -gt 0 ] 2>/dev/null && break
        sleep 0.05
    done
    record "boot1_writes_in_flight" "$writes"
    sleep 0.1
}

hc_boot1() {
    hc_disks
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$STATE_DEV" || die "mkfs.ext4 failed"
    mkdir -p "$HC_MNT"
    mount -t ext4 "$STATE_DEV" "$HC_MNT" || die "cannot mount the state disk"
    start_daemon
    create_mirror "$HC_NAME" "$HC_TABLE"
    wait_sync "$HC_NAME" 300
    check "boot1_sync" "$(sync_field "$HC_NAME")" "$HC_REGIONS/$HC_REGIONS"
    check "boot1_resync_initial" "$(resync_count)" "$HC_REGIONS"
    check "boot1_legs_after_resync" "$(cmp_legs)" equal
    record "boot1_boot_id" "$(cat /proc/sys/kernel/random/boot_id)"
    slow_leg "${CRASH_DELAY_MS:-2000}"
    record "boot1_slow_leg" "$(dm_table "$HC_SLOW")"
    spread_writers "${CRASH_WRITERS:-3}"
    sleep "${CRASH_AFTER:-6}"
    record "boot1_writes_started" "$(cat "$SOUT"/writer*.log | grep -c '^start')"
    record "boot1_write_failures" "$(cat "$SOUT"/writer*.log | grep -c 'failed')"
    record "boot1_sync_at_crash" "$(sync_field "$HC_NAME")"
    crash_guest writes_in_flight
}

hc_boot2() {
    local diff view resynced first resume missed
    hc_disks
    record "boot2_boot_id" "$(cat /proc/sys/kernel/random/boot_id)"
    mkdir -p "$HC_MNT"
    mount -t ext4 "$STATE_DEV" "$HC_MNT" || die "cannot mount the state disk after the crash"
    diff=$(leg_diff)
    record "boot2_diff_regions" "${diff%% *}"
    record "boot2_diff_ranges" "${diff#* }"
    record "boot2_in_flight_at_crash" "$(in_flight_at_crash | wc -l)"
    record "boot2_in_flight_ranges" "$(in_flight_at_crash | to_ranges)"
    # The writers never overlap, so the legs can only differ where a write was in flight.
    check "boot2_diff_outside_in_flight" \
        "$(comm -23 <(expand_ranges "${diff#* }" | sort) <(in_flight_at_crash | sort) | wc -l)" 0
    if [ "$BACKEND" = lmdb ]; then
        read -r -a view <<<"$(store_view)"
        record "boot2_store_dirty" "${view[0]}"
        record "boot2_store_out_of_sync" "${view[1]}"
        record "boot2_store_dirty_ranges" "${view[2]}"
        record "boot2_store_out_of_sync_ranges" "${view[3]}"
    fi
    DAEMON_STARTS=1  # boot 1 started the daemon once: this start's capture is capture.2.bin
    start_daemon
    create_mirror "$HC_NAME" "$HC_TABLE"
    first=$(sync_field "$HC_NAME")
    record "boot2_sync_first_status" "$first"
    wait_sync "$HC_NAME" 300
    check "boot2_sync" "$(sync_field "$HC_NAME")" "$HC_REGIONS/$HC_REGIONS"
    resume=$(sed -n '/^=== start 2 /,$p' "$SOUT/daemon.log" | grep "RESUME uuid='$HC_UUID'" \
        | sed -n 's/.*: \([0-9]*\)\/[0-9]* in sync.*/\1/p' | head -1)
    record "boot2_in_sync_at_resume" "${resume:-n/a}"
    resynced=$(boot2_resynced_regions | wc -l)
    record "boot2_resynced" "$resynced"
    record "boot2_regions" "$HC_REGIONS"
    # Every region the crash left different must have been resynced (else the legs could not end
    # identical, but this says which).
    missed=$(comm -23 <(expand_ranges "${diff#* }" | sort) <(boot2_resynced_regions | sort) | wc -l)
    check "boot2_diff_not_resynced" "$missed" 0
    check "boot2_legs_final" "$(cmp_legs)" equal
    remove_mirror "$HC_NAME"
    timeout 60 dmsetup --noudevsync remove "$HC_SLOW" || fail "cannot remove $HC_SLOW"
    stop_daemon
    umount "$HC_MNT" || fail "cannot unmount the state disk"
}

scenario_host_crash() {
    record "boot${BOOT}_backend" "$BACKEND"
    case $BOOT in
        1) hc_boot1 ;;
        2) hc_boot2 ;;
        *) die "host-crash has two boots (ulogvm.py run --boots 2), this is boot $BOOT" ;;
    esac
}

main_scenario host-crash
