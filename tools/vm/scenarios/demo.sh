#!/bin/bash
# The README's main job: a mirror served by dm-ulogd with the LMDB store; a writer runs; the daemon is
# killed with SIGKILL and restarted; then the mirror is removed and created again. Prints what survived.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# store_dirty UUID: "COUNT RANGES" of UUID's dirty regions (ranges of region numbers, "none" if none),
# read from the store with ulog-dump, read-only: what a restart of the daemon will restore.
store_dirty() {
    "$PY" -m ulog_disk.tools.dump store "$STATE" --uuid "$1" --json \
        | "$PY" -c 'import json, sys
states = [s for st in json.load(sys.stdin)["stores"] for s in st["instances"]]
s = states[0] if states else {}
print("?" if s.get("dirty") is None else s["dirty"], s.get("dirty_ranges") or ("none" if s else "no-instance"))'
}

# kernel_says PATTERN: how many of the kernel's messages since the scenario started match PATTERN.
kernel_says() { scen_dmesg | grep -c "$1"; }

scenario_demo() {
    local name=ulog-demo uuid=LVM-demo-mirror before after dirty killed back
    setup_mirror "$name" "$uuid" clustered-core
    record "status_after_create" "$(dm_status "$name")"
    before=$(resync_count)
    background_writer "$name" 180
    # A second writer streams through the whole mirror, so some regions are mid-write at the kill.
    (while kill -0 "$WRITER_PID" 2>/dev/null; do
        dd if=/dev/zero of="/dev/mapper/$name" bs=64K count=256 oflag=direct status=none || break
    done) 2>/dev/null &
    streamer=$!
    log "two writers running; dm-ulogd is killed after 4 MiB of random writes"
    wait_writes 4
    kill9_daemon
    killed=$(now)
    record "kill_uptime" "$killed"
    dirty=$(store_dirty "$uuid")
    record "dirty_region_count_at_crash" "${dirty%% *}"
    record "dirty_regions_at_crash" "${dirty#* }"
    log "dm-ulogd stays down 5 s more; the kernel's log requests fail meanwhile and the writes wait"
    sleep 5  # the outage itself: the summary reports it, measured
    start_daemon
    back=$(now)
    record "restart_uptime" "$back"
    record "outage_seconds" "$(awk -v a="$killed" -v b="$back" 'BEGIN { printf "%.1f", b - a }')"
    finish_writer 8
    wait "$streamer"  # ends with its current pass once the first writer is done
    check "writes_failed" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    after=$(resync_count)
    check "regions_resynced_after_restart" "$((after - before))" 0
    check "sync_after_restart" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "legs_after_restart" "$(cmp_legs)" equal
    # The kernel's own account of the outage, into scenario.log directly: the console showed the
    # errors among them as they came, and one `log` per line costs a process start each.
    log "the kernel's messages about the log server (dmesg) follow in scenario.log"
    scen_dmesg | grep 'dm-log-userspace' | sed 's/^/    dmesg: /' >>"$OUT/scenario.log"
    record "kernel_send_failures" "$(kernel_says 'Unable to send log request')"
    record "kernel_timeouts" "$(kernel_says 'timed out')"
    record "kernel_server_not_found" "$(kernel_says 'Userspace log server not found')"
    record "kernel_reconnects" "$(kernel_says 'Reconnected to userspace log server')"
    # Deactivate and activate again: a new luid adopts the uuid's retained state.
    remove_mirror "$name"
    before=$(resync_count)
    create_mirror "$name" "$MIRROR_TABLE"
    wait_sync "$name" 120
    check "regions_resynced_after_reactivation" "$(($(resync_count) - before))" 0
    check "legs_final" "$(cmp_legs)" equal
    record "status_final" "$(dm_status "$name")"
    remove_mirror "$name"
    stop_daemon
}

main_scenario demo
