#!/bin/bash
# The state directory lost while a mirror is live: the daemon is killed, its state
# directory wiped, and it starts again with nothing while a writer runs. The kernel re-registers its
# log (CTR + NUL, RESUME); the log must come back with every region out of sync (a full resync,
# logged as such, once), never clean; the writer goes on, the legs end identical.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_state_lost() {
    local name=ulog-state-lost uuid=ulogvm-state-lost before i
    setup_mirror "$name" "$uuid" clustered-core
    background_writer "$name" 180
    wait_writes 2
    kill9_daemon
    rm -rf "$STATE"
    log "state directory $STATE wiped"
    before=$(resync_count)
    start_daemon
    # The kernel notices at its next request of the log (the writer's, a status) and reconnects.
    for ((i = 0; i < 600; i++)); do
        grep -q 'has no state for' "$SOUT/daemon.log" && break
        sleep 0.1
    done
    record "reconnect_seconds" "$((i / 10))"
    check "no_state_logged" "$(grep -c 'has no state for' "$SOUT/daemon.log")" 1
    check "sync_after_reconnect" "$(sync_field "$name")" "0/$MIRROR_REGIONS"
    finish_writer 4
    check "writer_ok" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    resume_and_resync "$name" "$before" resync_after_state_lost "$MIRROR_REGIONS"
    check "legs_final" "$(cmp_legs)" equal
    remove_mirror "$name"
    stop_daemon
}

main_scenario state-lost
