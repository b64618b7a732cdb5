#!/bin/bash
# Upgrade under a live mirror: the previous release of dm-ulogd (OLD_CHECKOUT: a copy of
# its ulog_disk/, the last commit before store layout 3 and the journal) serves a mirror with a
# writer running; it is stopped with SIGTERM and this release starts on the same state directory.
# The mirror goes on, the store is migrated to layout 3, nothing resyncs, the legs end identical.
# Then the reverse: the previous release on the migrated store must refuse it with a clear message
# (it reads layouts 1 and 2 only) and never misread it: its log comes back all out of sync.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# store_layout UUID: the layout version in the uuid's format record (read-only, no lock).
store_layout() {
    "$PY" - "$STATE/u.$1" <<'PYEOF'
import sys
import lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, subdir=True)
value = env.begin().get(b"format")
print(int.from_bytes(value[4:6], "little") if value else "none")
PYEOF
}

scenario_upgrade() {
    local name=ulog-upgrade uuid=ulogvm-upgrade old=${OLD_CHECKOUT:-} before i reconnects
    [ -n "$old" ] && [ -d "$old/ulog_disk" ] || die "OLD_CHECKOUT must name a copy of the previous release"
    log "previous release from $old"
    DAEMON_DIR=$old setup_mirror "$name" "$uuid" clustered-core
    check "layout_before" "$(store_layout "$uuid")" 2
    background_writer "$name" 20
    sleep 3
    DAEMON_DIR=$old stop_daemon                 # SIGTERM: the previous release commits and exits 0
    before=$(resync_count)
    start_daemon                                # this release, same state directory
    wait_writer
    check "writer_ok" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    check "layout_after" "$(store_layout "$uuid")" 3
    check "migrated_logged" "$(grep -c 'rewriting it from layout 2' "$SOUT/daemon.log")" 1
    check "sync_after_upgrade" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    # A real resume: whatever the log holds out of sync is recovered now.
    timeout 60 dmsetup suspend "$name"; check "suspend_rc" "$?" 0
    timeout 60 dmsetup resume "$name"; check "resume_rc" "$?" 0
    wait_sync "$name" 60
    check "resync_after_upgrade" "$(($(resync_count) - before))" 0
    check "legs_after_upgrade" "$(cmp_legs)" equal
    # The reverse: the previous release on a layout-3 store.
    stop_daemon
    before=$(resync_count)
    reconnects=$(grep -c 'kernel reconnect' "$SOUT/daemon.log")
    DAEMON_DIR=$old start_daemon
    # The kernel notices at its next request of the log (a status asks it) and reconnects.
    for ((i = 0; i < 600; i++)); do
        [ "$(grep -c 'kernel reconnect' "$SOUT/daemon.log")" -gt "$reconnects" ] && break
        ((i % 10 == 0)) && dm_status "$name" >/dev/null
        sleep 0.1
    done
    record "reverse_reconnect_seconds" "$((i / 10))"
    check "old_refuses_layout_3" "$(grep -c 'reads only version 1 and 2' "$SOUT/daemon.log" | \
        awk '{ print ($1 > 0) ? "yes" : "no" }')" yes
    check "old_reads_all_out_of_sync" "$(sync_field "$name")" "0/$MIRROR_REGIONS"
    resume_and_resync "$name" "$before" resync_by_previous_release "$MIRROR_REGIONS" _2
    check "legs_after_reverse" "$(cmp_legs)" equal
    remove_mirror "$name"
    DAEMON_DIR=$old stop_daemon
}

main_scenario upgrade
