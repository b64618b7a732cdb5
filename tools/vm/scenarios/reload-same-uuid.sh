#!/bin/bash
# Reload with the same uuid while live (what pvmove/lvconvert do): the new table's log is a second
# instance (new luid, same uuid) until the swap; after suspend + resume the new instance must carry the
# old one's state, so no full resync happens.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_reload_same_uuid() {
    local name=ulog-reload uuid=ulogvm-reload before
    setup_mirror "$name" "$uuid" clustered-core
    odirect_write "$name" 1024 256
    before=$(resync_count)
    timeout 60 dmsetup reload "$name" --table "$MIRROR_TABLE"; check "reload_rc" "$?" 0
    check "inactive_table_present" "$(dmsetup info "$name" | grep -c 'Tables present:.*INACTIVE')" 1
    # the live table keeps working while the inactive one exists
    odirect_write "$name" 3072 256
    timeout 60 dmsetup suspend "$name"; check "suspend_rc" "$?" 0
    timeout 60 dmsetup resume "$name"; check "resume_rc" "$?" 0
    wait_sync "$name" 120
    check "sync_after_swap" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    record "resync_after_swap" "$(($(resync_count) - before))"
    check "full_resync_after_swap" "$([ $(($(resync_count) - before)) -ge "$MIRROR_REGIONS" ] && echo yes || echo no)" no
    check "legs_after_swap" "$(cmp_legs)" equal
    odirect_write "$name" 5120 256
    check_status_table "$name" "$uuid" clustered-core
    remove_mirror "$name"
    stop_daemon
    check "luids_in_capture" "$(capture_luids "$uuid")" 2
    record "daemon_log_luids" "$(grep -oE '0x[0-9a-f]{8,16}' "$SOUT/daemon.log" | sort -u | wc -l)"
}

main_scenario reload-same-uuid
