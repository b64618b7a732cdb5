#!/bin/bash
# Soak: a writer runs for SOAK_SECONDS (default 120; the long soak is 600) while the
# mirror is suspended and resumed, reloaded with the same table and uuid (a new luid takes over the
# state at resume), over and over, and the daemon is killed with SIGKILL twice (at 1/3 and 2/3 of the
# run) and restarted DOWN_SECONDS (default 3) later. At the end: every write succeeded, the legs are
# identical, and no event cost a full resync (at most the regions being written at the time).
#
#   python3 tools/vm/ulogvm.py run soak                                   # CI length
#   python3 tools/vm/ulogvm.py run soak --env SOAK_SECONDS=600 --timeout 1200   # the long soak
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# note_resyncs R0 LABEL: the regions resynced since R0 (a resync_count) go into resync_events as
# LABEL<count>; max_delta keeps the largest.
note_resyncs() {
    delta=$(($(resync_count) - $1))
    resync_events="$resync_events $2$delta"
    [ "$delta" -gt "$max_delta" ] && max_delta=$delta
}

# full_resyncs: RESUMEs in the daemon log that left the log with nothing in sync (a full resync).
full_resyncs() {
    grep -cE "RESUME uuid='$1' .*: 0/$MIRROR_REGIONS in sync" "$SOUT/daemon.log" 2>/dev/null || true
}

scenario_soak() {
    local name=ulog-soak uuid=ulogvm-soak secs=${SOAK_SECONDS:-120} down=${DOWN_SECONDS:-3}
    local t0 now elapsed kills=0 events=0 suspends=0 reloads=0 failed=0 r0 delta max_delta=0 base
    local resync_events="" initial_full label
    setup_mirror "$name" "$uuid" clustered-core
    initial_full=$(full_resyncs "$uuid")
    base=$(resync_count)
    background_writer "$name" "$secs"
    t0=$(date +%s)
    while :; do
        now=$(date +%s)
        elapsed=$((now - t0))
        [ "$elapsed" -ge $((secs - 8)) ] && break
        if [ "$kills" -lt 2 ] && [ "$elapsed" -ge $(((kills + 1) * secs / 3)) ]; then
            r0=$(resync_count)
            kill9_daemon
            log "daemon down for ${down}s while the writer runs (kill $((kills + 1)))"
            sleep "$down"  # the outage itself
            start_daemon
            kills=$((kills + 1))
            # Writes through the restarted daemon (a request the killed one never answered times
            # out first: 15 s), so that what the kill cost is counted for it.
            wait_writes 2 180 or-end
            note_resyncs "$r0" kill:
            continue
        fi
        r0=$(resync_count)
        if [ $((events % 2)) -eq 0 ]; then
            # suspend + resume of the same table
            timeout 60 dmsetup suspend "$name" || { failed=$((failed + 1)); log "suspend failed"; }
            timeout 60 dmsetup resume "$name" || { failed=$((failed + 1)); log "resume failed"; }
            suspends=$((suspends + 1))
            label=s:
        else
            # reload with the same table and uuid: the inactive table's log is a new luid until the swap
            timeout 60 dmsetup reload "$name" --table "$MIRROR_TABLE" || { failed=$((failed + 1)); log "reload failed"; }
            wait_writes 1 60 or-end  # the live table serves writes while the inactive one exists
            timeout 60 dmsetup suspend "$name" || { failed=$((failed + 1)); log "suspend failed"; }
            timeout 60 dmsetup resume "$name" || { failed=$((failed + 1)); log "resume failed"; }
            reloads=$((reloads + 1))
            label=r:
        fi
        events=$((events + 1))
        wait_writes 2 60 or-end  # writes between two events
        note_resyncs "$r0" "$label"
    done
    wait_writer
    check "writer_ok" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    record "resync_events" "${resync_events# }"
    check "dmsetup_failures" "$failed" 0
    check "kills" "$kills" 2
    record "suspend_resumes" "$suspends"
    record "reloads" "$reloads"
    record "resync_during_soak" "$(($(resync_count) - base))"
    record "max_resync_per_event" "$max_delta"
    check "full_resync_per_event" "$([ "$max_delta" -ge "$MIRROR_REGIONS" ] && echo yes || echo no)" no
    check "full_resyncs_after_setup" "$(($(full_resyncs "$uuid") - initial_full))" 0
    # A last suspend + resume resets the kernel's in-sync hint: whatever the log holds out of sync is
    # recovered now; then the legs must be identical.
    timeout 60 dmsetup suspend "$name"; check "final_suspend_rc" "$?" 0
    timeout 60 dmsetup resume "$name"; check "final_resume_rc" "$?" 0
    wait_sync "$name" 180
    check "sync_final" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "legs_final" "$(cmp_legs)" equal
    record "diff_regions_final" "$(count_diff_regions "$MIRROR_REGION")"
    record "luids_in_capture" "$(capture_luids "$uuid")"
    record "dmesg_timed_out" "$(scen_dmesg | grep -c 'timed out')"
    record "dmesg_reconnected" "$(scen_dmesg | grep -c 'Reconnected to userspace log server')"
    check_status_table "$name" "$uuid" clustered-core
    remove_mirror "$name"
    stop_daemon
}

main_scenario soak
