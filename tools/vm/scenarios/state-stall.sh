#!/bin/bash
# The state directory's disk stops completing I/O for longer than the kernel's 15 s request timeout
# while a mirror writes. The state directory is an ext4 on a dm linear device over the
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
# Result keys (state-stall.*): stall_seconds, status_during_stall (how many `dmsetup status`
# started while the disk was stalled), status_during_stall_max_seconds (the slowest), health_during_stall, timed_out
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

# status_prober NAME: until $SOUT/probe-stop exists, one `dmsetup status NAME` after another, 1 s
# apart, each as a line "START_UPTIME SECONDS HEALTH" (HEALTH: the log's, the status line's last
# field; "none" if the status failed) in $SOUT/probes.txt. Runs in the background: a status the
# daemon does not answer waits in the kernel (uninterruptible, resent every 15 s), and the stall
# must end on time whatever it does.
status_prober() {
    local t0 line
    while [ ! -e "$SOUT/probe-stop" ]; do
        t0=$(now)
        line=$(dmsetup status "$1" 2>/dev/null)
        line=${line##* }
        echo "$t0 $(elapsed "$t0") ${line:-none}" >>"$SOUT/probes.txt"
        sleep 1
    done
}

# daemon_stacks FILE: every daemon thread's name, state and kernel stack (where it waits).
daemon_stacks() {
    local task
    for task in /proc/"$DAEMON_PID"/task/*; do
        echo "== $(cat "$task/comm") state=$(awk '/^State/ { print $2 }' "$task/status") wchan=$(cat "$task/wchan")"
        cat "$task/stack" 2>/dev/null
    done >"$1"
}

scenario_state_stall() {
    local name=ulog-stall uuid=ulogvm-state-stall stall=${STALL_SECONDS:-25} before t0 t1 timed_out prober
    stall_state_disk
    setup_mirror "$name" "$uuid" clustered-disk
    before=$(resync_count)
    background_writer "$name" $((stall + 25))
    sleep 3
    t0=$(now)
    timeout 60 dmsetup suspend --nolockfs "$STALL_DEV" || die "cannot suspend $STALL_DEV"
    log "state disk stalled (every I/O to it held) for ${stall}s"
    status_prober "$name" &
    prober=$!
    sleep $((stall / 2))
    daemon_stacks "$SOUT/stacks-mid-stall.txt"
    log "daemon threads mid-stall: $(grep '^==' "$SOUT/stacks-mid-stall.txt" | tr '\n' ' ')"
    sleep "$(awk -v e="$(elapsed "$t0")" -v l="$stall" 'BEGIN { d = l - e; print (d > 0 ? d : 0) }')"
    t1=$(now)
    timeout 60 dmsetup resume "$STALL_DEV" || die "cannot resume $STALL_DEV"
    record "stall_seconds" "$(elapsed "$t0")"
    log "state disk back"
    touch "$SOUT/probe-stop"
    wait "$prober"
    # The probes that started during the stall: how long the slowest waited, what health they saw.
    record "status_during_stall" "$(awk -v a="$t0" -v b="$t1" '$1 >= a && $1 < b' "$SOUT/probes.txt" | wc -l)"
    record "status_during_stall_max_seconds" \
        "$(awk -v a="$t0" -v b="$t1" '$1 >= a && $1 < b && $2 > m { m = $2 } END { print m + 0 }' "$SOUT/probes.txt")"
    check "health_during_stall" \
        "$(awk -v a="$t0" -v b="$t1" '$1 >= a && $1 < b { print $3 }' "$SOUT/probes.txt" | sort -u | xargs)" A
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
        [ "$key" = unanswered ] || record "$key" "$value"
    done < <("$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" latency "$SOUT"/capture*.bin
             "$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" resends "$SOUT/dmesg-stall.txt" "$SOUT"/capture*.bin)
    check "unanswered" "${scan[unanswered]:-?}" 0
    check "timed_out_seen" "${scan[originals_received]:-?}" "$timed_out"
    check "resends_answered" "${scan[resends_answered]:-?}" "$timed_out"
    umount "$STALL_MNT" || log "cannot unmount $STALL_MNT"
    timeout 30 dmsetup --noudevsync remove "$STALL_DEV" || log "cannot remove $STALL_DEV"
}

main_scenario state-stall
