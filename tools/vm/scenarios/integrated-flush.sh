#!/bin/bash
# clustered-core mirror with `integrated_flush`: marks arrive as FLUSH requests carrying regions (no
# MARK_REGION) and a delayed payload-less FLUSH follows 3 s after clears.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_integrated_flush() {
    local name=ulog-iflush uuid=ulogvm-iflush waited
    setup_mirror "$name" "$uuid" clustered-core integrated_flush
    odirect_write "$name" 0 1024
    check "legs_after_write" "$(cmp_legs)" equal
    # The write's clears are followed by the kernel's delayed flush (3 s later, no payload): wait for
    # it in the capture before the next write.
    waited=$("$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" flushed "$uuid" 20 "$SOUT"/capture*.bin) ||
        fail "no delayed flush (FLUSH without payload) within 20 s of the write's clears"
    record "delayed_flush_wait_seconds" "$waited"
    odirect_write "$name" 8192 256
    check "legs_after_write2" "$(cmp_legs)" equal
    check_status_table "$name" "$uuid" clustered-core integrated_flush
    remove_mirror "$name"
    stop_daemon
    # request types 9 = FLUSH, 10 = MARK_REGION among the requests in the capture
    record "capture_mark_region" "$("$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" headers "$uuid" \
        "$SOUT"/capture*.bin | awk '$3 == 10' | wc -l)"
    record "capture_flush_with_payload" "$("$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" headers "$uuid" \
        "$SOUT"/capture*.bin | awk '$3 == 9 && $4 > 0' | wc -l)"
}

main_scenario integrated-flush
