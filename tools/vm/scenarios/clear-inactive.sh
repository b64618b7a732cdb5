#!/bin/bash
# Load a table into the inactive slot and clear it (`dmsetup reload` + `dmsetup clear`): the inactive
# instance is destroyed (DTR, never resumed) and the live one is untouched.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_clear_inactive() {
    local name=ulog-clear uuid=ulogvm-clear before
    setup_mirror "$name" "$uuid" clustered-core
    before=$(resync_count)
    timeout 60 dmsetup reload "$name" --table "$MIRROR_TABLE"; check "reload_rc" "$?" 0
    timeout 60 dmsetup clear "$name"; check "clear_rc" "$?" 0
    check "inactive_table_present" "$(dmsetup info "$name" | grep -c 'Tables present:.*INACTIVE')" 0
    # a second load + clear, then a load replaced by another load (DTR of the first inactive log)
    timeout 60 dmsetup reload "$name" --table "$MIRROR_TABLE"; check "reload2_rc" "$?" 0
    timeout 60 dmsetup reload "$name" --table "$MIRROR_TABLE"; check "reload3_rc" "$?" 0
    timeout 60 dmsetup clear "$name"; check "clear2_rc" "$?" 0
    odirect_write "$name" 2048 256
    check "legs_after_write" "$(cmp_legs)" equal
    check "sync_after_clear" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "resync_after_clear" "$(($(resync_count) - before))" 0
    check_status_table "$name" "$uuid" clustered-core
    check "daemon_alive" "$(kill -0 "$DAEMON_PID" 2>/dev/null && echo yes || echo no)" yes
    remove_mirror "$name"
    stop_daemon
    # 4 logs were constructed; the kernel may reuse a freed address as luid, so only record it
    record "luids_in_capture" "$(capture_luids "$uuid")"
}

main_scenario clear-inactive
