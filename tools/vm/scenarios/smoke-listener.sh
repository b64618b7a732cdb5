#!/bin/bash
# Harness self-test: a mirror with a `userspace` log served by tools/vm/smoke_listener.py (stdlib
# only, independent of the ulog_disk package). Proves: modules load, the netlink connector works from
# the chroot, dmsetup create/resync/write/status/table/suspend/resume/reload/clear/remove work.
# Also records the kernel's request sequence (trace.txt, summary.json, capture.bin).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_smoke_listener() {
    local py=$PY name=smoke uuid=ulogvm-smoke-0001 table t1 t2 st tb
    [ -x "$py" ] || py=python3
    record "python" "$("$py" -c 'import sys; print(sys.version.split()[0])')"
    record "kernel" "$(uname -r)"
    make_legs 2 16
    start_listener "$SOUT/ready" "$SOUT/daemon.log" "$py" "$ULOG_CHECKOUT/tools/vm/smoke_listener.py" \
        --ready-file "$SOUT/ready" --trace "$SOUT/trace.txt" --capture "$SOUT/capture.bin" \
        --summary "$SOUT/summary.json"
    table=$(mirror_table 32768 "$uuid" clustered-core 1024)
    create_mirror "$name" "$table"
    wait_sync "$name" 120
    check "sync_final" "$(sync_field "$name")" "32/32"
    check "legs_after_resync" "$(cmp_legs)" equal
    record "resync_regions" "$(resync_count)"
    odirect_write "$name" 1024 512
    check "legs_after_write" "$(cmp_legs)" equal

    t1=$(devno "${LEGS[0]}") t2=$(devno "${LEGS[1]}")
    st=$(dm_status "$name")
    tb=$(dm_table "$name")
    check "status" "$st" "0 32768 mirror 2 $t1 $t2 32/32 1 AA 1 clustered-core"
    check "table" "$tb" "0 32768 mirror userspace 3 $uuid clustered-core 1024 2 $t1 0 $t2 0"

    # suspend + resume of the same table
    echo "--- suspend/resume" >>"$SOUT/trace.txt"
    timeout 60 dmsetup suspend "$name"; check "suspend_rc" "$?" 0
    timeout 60 dmsetup resume "$name"; check "resume_rc" "$?" 0

    # reload with the same uuid into the inactive slot while live, then swap
    echo "--- reload same uuid" >>"$SOUT/trace.txt"
    timeout 60 dmsetup reload "$name" --table "$table"; check "reload_rc" "$?" 0
    echo "--- suspend + resume (swap)" >>"$SOUT/trace.txt"
    timeout 60 dmsetup suspend "$name"; check "swap_suspend_rc" "$?" 0
    timeout 60 dmsetup resume "$name"; check "swap_resume_rc" "$?" 0
    record "luids_for_uuid" "$(grep -o "CTR luid=0x[0-9a-f]* uuid=$uuid" "$SOUT/trace.txt" | sort -u | wc -l)"
    wait_sync "$name" 120
    check "legs_after_swap" "$(cmp_legs)" equal

    # load an inactive table and clear it
    echo "--- reload + clear" >>"$SOUT/trace.txt"
    timeout 60 dmsetup reload "$name" --table "$table"; check "reload2_rc" "$?" 0
    timeout 60 dmsetup clear "$name"; check "clear_rc" "$?" 0

    echo "--- remove" >>"$SOUT/trace.txt"
    remove_mirror "$name"
    stop_daemon
    check "listener_clean_stop" "$(grep -c 'stopped after' "$SOUT/daemon.log")" 1
    record "requests" "$(awk '/ seq=/ { n++ } END { print n + 0 }' "$SOUT/trace.txt")"
    record "request_types" "$(awk '/ seq=/ { c[$3]++ } END { for (t in c) printf "%s:%d,", t, c[t] }' \
        "$SOUT/trace.txt" | sed 's/,$//')"
    record "timeouts_in_dmesg" "$(dmesg | grep -c 'timed out')"
}

main_scenario smoke-listener
