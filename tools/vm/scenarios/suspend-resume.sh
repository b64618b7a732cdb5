#!/bin/bash
# suspend + resume of the same table: writes queued while suspended complete after resume, no resync
# of the whole mirror afterwards (the log keeps its state across suspend/resume).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# blocked_in_io PID LIMIT: "yes" once process PID sleeps uninterruptibly (state D: its write waits in
# the suspended device), "no" if it ends first or LIMIT s pass (an ended process is no proof: kill -0
# succeeds on a zombie).
blocked_in_io() {
    local st t0=$SECONDS
    while ((SECONDS - t0 <= $2)); do
        read -r st 2>/dev/null <"/proc/$1/stat" || break
        st=${st##*) }
        case ${st%% *} in
            D) echo yes; return ;;
            Z | X) break ;;
        esac
        sleep 0.05
    done
    echo no
}

scenario_suspend_resume() {
    local name=ulog-susp uuid=ulogvm-suspend-resume before
    setup_mirror "$name" "$uuid" clustered-core
    before=$(resync_count)
    timeout 60 dmsetup suspend "$name"; check "suspend_rc" "$?" 0
    record "suspended_info" "$(dmsetup info -c --noheadings -o attr "$name")"
    # a write issued while suspended waits until resume
    odirect_write_async() {
        exec dd if=/dev/urandom of="/dev/mapper/$name" bs=64K seek=100 count=4 oflag=direct conv=notrunc \
            status=none
    }
    odirect_write_async &
    local wpid=$!
    check "write_blocked_while_suspended" "$(blocked_in_io "$wpid" 10)" yes
    timeout 60 dmsetup resume "$name"; check "resume_rc" "$?" 0
    wait "$wpid"; check "blocked_write_rc" "$?" 0
    wait_sync "$name" 60
    check "sync_after_resume" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "resync_after_resume" "$(($(resync_count) - before))" 0
    check "legs_after_resume" "$(cmp_legs)" equal
    odirect_write "$name" 6144 256
    check_status_table "$name" "$uuid" clustered-core
    remove_mirror "$name"
    stop_daemon
}

main_scenario suspend-resume
