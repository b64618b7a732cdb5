#!/bin/bash
# One node dies (tools/vm/cluster2.py run node-dies): two guests, one mirror on shared legs, its
# clustered-core log served by dm-ulogd --cluster corosync in each guest.
#
# Both nodes: network, corosync (2 nodes, two_node), the state disk, dm-ulogd, the same mirror
# (same uuid, same table: 64 regions of 256 KiB, legs that differ at first: a full resync shared by
# the nodes), then the O_DIRECT writer (writer.py: disjoint and shared regions, never a shared block).
# Node 2's path to leg 1 is slow (dm-delay, writes only), so that it dies with writes in flight.
# The host kills node 2's qemu once both have written (cluster2.py NodeDies) and then tells node 1
# (peer-killed). Node 1, the survivor: corosync sees node 2 leave, dm-ulogd declares it departed
# (its marked regions out of sync and held), fences it (fence.sh: the host's kill; the cluster state
# recorded at that moment) and releases the held regions; a suspend + resume of the mirror makes the
# kernel ask for them (it does not by itself, see below) and they resync; node 1 writes on all the
# while (no write may fail), then stops, waits for the mirror in sync and removes it. The host then
# compares the legs (the raw images) byte for byte.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

UUID=ulogvm2-node-dies
NAME=ulog-cluster

scenario_node_dies() {
    local regions line_left line_departed line_resume t_notice held after
    trap cluster_cleanup EXIT
    SLOW_LEG=2 cluster_mirror_up "$UUID" "$NAME"
    regions=$REGIONS
    start_writer "$NAME"
    log "writing (node $NODE)"
    if [ "$NODE" != 1 ]; then
        # The victim: writes until the host kills its qemu.
        while :; do
            kill -0 "$WRITER_PY_PID" 2>/dev/null || die "the writer ended: $(tail -3 "$SOUT/writer.log")"
            sleep 1
        done
    fi
    # The survivor.
    until [ -s "$OUT/peer-killed" ]; do
        kill -0 "$WRITER_PY_PID" 2>/dev/null || die "the writer ended: $(tail -3 "$SOUT/writer.log")"
        sleep 0.2
    done
    t_notice=$(now)
    record "peer_killed_notice_uptime" "$t_notice"
    record "writes_at_notice" "$(writes_done)"
    line_left=$(wait_log 'cluster: member\(s\) left' 120) || die "the daemon never saw node 2 leave"
    record "left_seconds" "$(elapsed "$t_notice")"
    line_departed=$(wait_log 'cluster: node\(s\) [0-9, ]+ departed' 120) || die "node 2 never declared departed"
    record "departed_seconds" "$(elapsed "$t_notice")"
    record "departed_regions_logged" \
        "$(sed -n "${line_departed}s/.* departed: \([0-9]*\) region.*/\1/p" "$SOUT/daemon.log")"
    wait_log 'cluster: node [0-9]+ fenced' 120 >/dev/null || die "node 2 never fenced"
    record "fenced_seconds" "$(elapsed "$t_notice")"
    # What the survivor's log holds of the dead node's marks: its cluster state (ulog-recover list,
    # read-only), the regions the fence released (out of sync, recovered by nobody yet; the kernel
    # does not ask for them until its next resume, see below), with any still held.
    "$PY" -m ulog_disk.tools.recover list --state-dir "$STATE" --json >"$SOUT/recover-list-fenced.json" \
        2>"$SOUT/recover-list-fenced.err"
    held=$("$PY" - "$SOUT/recover-list-fenced.json" 2>&1 <<'EOF'
import json, sys

view = json.load(open(sys.argv[1]))["cluster"]
if view is None:  # --backend memory: the cluster state is in the daemon's memory only
    print("n/a n/a")
    sys.exit()
regions = set()
for log in view["logs"]:
    spans = [log["released"]["regions"]] + [h["regions"] for h in log["held"] if h["node"] == 2]
    for span in filter(None, ",".join(spans).split(",")):
        a, _, b = span.partition("-")
        regions.update(range(int(a), int(b or a) + 1))
print(len(regions), ",".join(map(str, sorted(regions))) or "none")
EOF
)
    record "held_count" "${held%% *}"
    record "held_regions" "${held#* }"
    # The survivor goes on writing: through the death, the fence, the resync and after it. None of
    # these writes may fail.
    wait_more_writes 40 240
    # The kernel does not ask for the released regions by itself: dm-log-userspace keeps the in-sync
    # hint the daemon gave it (the first region out of sync; the region count once the mirror was in
    # sync) and asks neither GET_RESYNC_WORK nor IS_REMOTE_RECOVERING at or above it until
    # its next resume (userspace_resume sets the hint to 0). So the survivor's count stays at the
    # regions minus the ones held: recorded here, then a suspend + resume starts the resync.
    record "sync_before_resume" "$(sync_field "$NAME")"
    line_resume=$(wc -l <"$SOUT/daemon.log")
    timeout 120 dmsetup suspend "$NAME"; check "suspend_rc" "$?" 0
    timeout 120 dmsetup resume "$NAME"; check "resume_rc" "$?" 0
    wait_sync "$NAME" 240
    check "sync_final" "$SYNC_STATUS" "$regions/$regions"
    wait_more_writes 20 240
    stop_writer
    check "writes_failed" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    after=$(recovered_regions "$line_left")
    record "resynced_after_death" "$(count_list "$after")"
    record "resynced_after_death_regions" "${after:-none}"
    after=$(recovered_regions "$line_resume")
    record "resynced_after_resume" "$(count_list "$after")"
    record "status_final" "$(dm_status "$NAME")"
    check_re "health_final" "$(dm_status "$NAME" | awk '{ print $(7 + $4) }')" "AA"
    "$PY" -m ulog_disk.tools.recover list --state-dir "$STATE" >"$SOUT/recover-list-final.txt" 2>&1
    remove_mirror "$NAME"
    stop_daemon
}

main_scenario node-dies
