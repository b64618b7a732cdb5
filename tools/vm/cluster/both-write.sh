#!/bin/bash
# Both nodes write (tools/vm/cluster2.py run both-write): two guests, one mirror on shared legs, its
# clustered-core log served by dm-ulogd --cluster corosync in each guest.
#
# Both nodes: network, corosync, the state disk, dm-ulogd, the same mirror (same uuid, same table),
# the first resync shared by the two kernels; then each writes WRITES random 64 KiB blocks with
# O_DIRECT (writer.py: disjoint and shared regions, never a shared block) and stops. Once both have
# stopped (barrier `written`), each waits for the mirror in sync and records its status; once both
# have (barrier `checked`), each removes its mirror and stops its daemon. The host then compares the
# legs (the raw images) byte for byte.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

UUID=ulogvm2-both-write
NAME=ulog-cluster

scenario_both_write() {
    local line_written
    trap cluster_cleanup EXIT
    cluster_mirror_up "$UUID" "$NAME"
    line_written=$(wc -l <"$SOUT/daemon.log")
    start_writer "$NAME"
    log "writing (node $NODE)"
    wait_more_writes "${WRITES:-120}" 300
    stop_writer
    check "writes_failed" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    barrier written
    wait_sync "$NAME" 120
    check "sync_final" "$SYNC_STATUS" "$REGIONS/$REGIONS"
    # Writes alone make nothing out of sync: no region is recovered again.
    check "resynced_after_writes" "$(count_list "$(recovered_regions "$line_written")")" 0
    record "status_final" "$(dm_status "$NAME")"
    check "health_final" "$(dm_status "$NAME" | awk '{ print $(7 + $4) }')" "AA"
    barrier checked
    remove_mirror "$NAME"
    stop_daemon
}

main_scenario both-write
