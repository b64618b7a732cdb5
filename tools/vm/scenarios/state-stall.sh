#!/bin/bash
# The state directory's disk stops completing I/O for longer than the kernel's 15 s request timeout
# while a mirror writes (issue #12). The state directory is an ext4 on a dm linear device over the
# run's disk `state`; `dmsetup suspend --nolockfs` holds every I/O to it for STALL_SECONDS (default
# 25): writes still reach the page cache, every fdatasync (the journal's, LMDB's) waits. The
# mirror's FLUSHes cannot be answered meanwhile; the kernel times them out after 15 s and sends them
# again with new sequence numbers.
#
# Required: no deadlock; every request answered (the late originals too: the kernel ignores those
# replies); the resends answered; requests that need no disk (STATUS, GET_SYNC_COUNT: `dmsetup
# status`) answered during the stall; health A throughout (a stall is not a failure: the kernel's
# own disk log shows A while its device is slow, and a D or F would make dmeventd "repair" the log);
# after the disk returns the writer goes on, the legs end identical and nothing resyncs.
#
# Result keys (state-stall.*): stall_seconds, status_during_stall_max_seconds (slowest `dmsetup
# status` while the disk was stalled), status_during_stall_failed, health_during_stall, timed_out
# (the kernel's timeouts), resends_answered, max_reply_seconds (slowest reply, daemon's view: read ->
# sent) and max_reply_type, resync_after_stall.
#
# ulogvm-run: --disk state:64M
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

STALL_DEV=ulog-statedisk
STALL_MNT=$WORK/statedisk

# stall_state_disk: the state directory on an ext4 over dm linear ($STALL_DEV) over the disk `state`.
stall_state_disk() {
    local disk
    disk=$(disk_dev state) || die "no disk 'state' (ulogvm.py run state-stall declares it)"
    timeout 60 dmsetup --noudevsync create "$STALL_DEV" --table "0 $(sectors "$disk") linear $disk 0" \
        || die "cannot create $STALL_DEV"
    dmsetup mknodes "$STALL_DEV"
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "/dev/mapper/$STALL_DEV" || die "mkfs.ext4 failed"
    mkdir -p "$STALL_MNT"
    mount -t ext4 "/dev/mapper/$STALL_DEV" "$STALL_MNT" || die "cannot mount the state disk"
    STATE=$STALL_MNT/state
    log "state directory $STATE on /dev/mapper/$STALL_DEV over $disk"
}

# status_probe NAME: "SECONDS HEALTH" of one `dmsetup status` (health: the log's, last field).
status_probe() {
    local t0 line
    t0=$(now)
    line=$(timeout 40 dmsetup status "$1")
    echo "$(elapsed "$t0") ${line##* }"
}

scenario_state_stall() {
    local name=ulog-stall uuid=ulogvm-state-stall stall=${STALL_SECONDS:-25} before t0 probe
    local worst=0 failed=0 healths="" sec health timed_out
    stall_state_disk
    setup_mirror "$name" "$uuid" clustered-disk
    before=$(resync_count)
    background_writer "$name" $((stall + 25))
    sleep 3
    t0=$(now)
    timeout 60 dmsetup suspend --nolockfs "$STALL_DEV" || die "cannot suspend $STALL_DEV"
    log "state disk stalled (every I/O to it held) for ${stall}s"
    while awk -v e="$(elapsed "$t0")" -v l="$stall" 'BEGIN { exit !(e < l - 2) }'; do
        probe=$(status_probe "$name")
        read -r sec health <<<"$probe"
        log "dmsetup status during the stall: ${sec}s, health ${health:-none}"
        [ -n "$health" ] || failed=$((failed + 1))
        healths="$healths ${health:-none}"
        worst=$(awk -v a="$worst" -v b="$sec" 'BEGIN { print (b > a ? b : a) }')
        sleep 2
    done
    sleep "$(awk -v e="$(elapsed "$t0")" -v l="$stall" 'BEGIN { d = l - e; print (d > 0 ? d : 0) }')"
    timeout 60 dmsetup resume "$STALL_DEV" || die "cannot resume $STALL_DEV"
    record "stall_seconds" "$(elapsed "$t0")"
    log "state disk back"
    record "status_during_stall_max_seconds" "$worst"
    check "status_during_stall_failed" "$failed" 0
    check "health_during_stall" "$(echo "$healths" | tr ' ' '\n' | sort -u | tr '\n' ' ' | xargs)" A
    wait_writer
    check "writer_ok" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    dmesg >"$SOUT/dmesg-stall.txt"
    timed_out=$(grep -c 'Request timed out' "$SOUT/dmesg-stall.txt")
    # The stall must have outlasted the kernel's timeout, or this scenario proved nothing.
    check_re "timed_out" "$timed_out" '^[1-9][0-9]*$'
    wait_sync "$name" 120
    check "sync_final" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "resync_after_stall" "$(($(resync_count) - before))" 0
    check "legs_final" "$(cmp_legs)" equal
    check "status_final" "$(dm_status "$name")" "$(expected_status clustered-disk)"
    remove_mirror "$name"
    stop_daemon
    local -A scan
    while IFS='=' read -r key value; do
        scan[$key]=$value
        record "$key" "$value"
    done < <("$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" latency "$SOUT"/capture*.bin
             "$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" resends "$SOUT/dmesg-stall.txt" "$SOUT"/capture*.bin)
    check "unanswered" "${scan[unanswered]:-?}" 0
    check "timed_out_seen" "${scan[originals_received]:-?}" "$timed_out"
    check "resends_answered" "${scan[resends_answered]:-?}" "$timed_out"
    umount "$STALL_MNT" || log "cannot unmount $STALL_MNT"
    timeout 30 dmsetup --noudevsync remove "$STALL_DEV" || log "cannot remove $STALL_DEV"
}

main_scenario state-stall
