#!/bin/bash
# The same crash with the volatile memory backend (what cmirrord does): the restarted daemon knows
# nothing, the kernel reconnects (CTR + RESUME), and the next real resume resyncs every region.
# The LMDB scenario (kill9-restart) resyncs none. Legs may differ between the crash and that resume.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_kill9_memory() {
    local name=ulog-kill9-memory uuid=ulogvm-kill9-memory after
    BACKEND=memory
    setup_mirror "$name" "$uuid" clustered-core
    background_writer "$name" 180
    wait_writes 2
    kill9_daemon
    sleep 3  # the outage itself
    start_daemon
    finish_writer 4
    after=$(resync_count)
    record "sync_after_writer" "$(sync_field "$name")"
    record "legs_after_writer" "$(cmp_legs)"
    resume_and_resync "$name" "$after" resync_after_resume "$MIRROR_REGIONS"
    check "legs_final" "$(cmp_legs)" equal
    remove_mirror "$name"
    stop_daemon
}

main_scenario kill9-memory
