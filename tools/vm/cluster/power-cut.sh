#!/bin/bash
# Both nodes lose power at once (tools/vm/cluster2.py run power-cut): two guests, one mirror on shared
# legs, its clustered-core log served by dm-ulogd --cluster corosync in each guest; two boots.
#
# Boot 1, both nodes: network, corosync, the state disk (ext4, made now), dm-ulogd, the same mirror,
# the first resync, then the O_DIRECT writer; leg 1 is slow on both (dm-delay, writes only), so each
# has writes in flight. The host kills both qemu processes at once while both write (cluster2.py
# PowerCut): nothing the guests had not flushed reaches their state disks.
# Boot 2, on the same disks: corosync, the state disk mounted again; the cluster state each node's
# state directory holds (ulog-recover list, before dm-ulogd starts: the marks durable at the cut);
# node 1 compares the legs region by region (what the cut left different); then dm-ulogd on both (the
# cluster forms again from both state directories), the same mirror again (no dm-delay now) on both,
# in sync: the regions resynced must be the regions marked at the cut, every region the cut left
# different among them. The host compares the legs at the end byte for byte.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

UUID=ulogvm2-power-cut
NAME=ulog-cluster

# marks_in_state: "COUNT REGIONS" of the regions marked by any node or out of sync in this node's
# cluster state (its state directory, read-only), for UUID.
marks_in_state() {
    "$PY" -m ulog_disk.tools.recover list --state-dir "$STATE" --json >"$SOUT/recover-list-boot$BOOT.json" \
        2>"$SOUT/recover-list-boot$BOOT.err"
    "$PY" - "$SOUT/recover-list-boot$BOOT.json" "$UUID" 2>&1 <<'PY'
import json, sys

view = json.load(open(sys.argv[1]))["cluster"] or {"logs": []}
regions = set()
for log in view["logs"]:
    if log["uuid"] != sys.argv[2]:
        continue
    spans = [log["out_of_sync"]] + [m["regions"] for m in log["marks"]]
    for span in filter(None, ",".join(spans).split(",")):
        a, _, b = span.partition("-")
        regions.update(range(int(a), int(b or a) + 1))
print(len(regions), ",".join(map(str, sorted(regions))) or "none")
PY
}

# legs_diff_regions: "COUNT REGIONS" of the regions in which the shared legs differ (read directly).
legs_diff_regions() {
    "$PY" - "${LEGS[0]}" "${LEGS[1]}" "$((REGION_SECTORS * 512))" <<'PY'
import os, sys

size = int(sys.argv[3])
fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in sys.argv[1:3]]
import mmap
bufs = [mmap.mmap(-1, size), mmap.mmap(-1, size)]
diff, r = [], 0
while True:
    n = [os.readv(fd, [b]) for fd, b in zip(fds, bufs)]
    if not n[0]:
        break
    if bufs[0][:n[0]] != bufs[1][:n[1]]:
        diff.append(r)
    r += 1
print(len(diff), ",".join(map(str, diff)) or "none")
PY
}

scenario_power_cut() {
    local line_start marks diff resynced
    trap cluster_cleanup EXIT
    if [ "$BOOT" = 1 ]; then
        SLOW_LEG=all cluster_mirror_up "$UUID" "$NAME"
        record "boot1_boot_id" "$(cat /proc/sys/kernel/random/boot_id)"
        start_writer "$NAME"
        log "writing (node $NODE); the host cuts the power of both nodes"
        while :; do
            kill -0 "$WRITER_PY_PID" 2>/dev/null || die "the writer ended: $(tail -3 "$SOUT/writer.log")"
            sleep 1
        done
    fi
    record "boot2_boot_id" "$(cat /proc/sys/kernel/random/boot_id)"
    net_up
    corosync_up
    state_disk_up
    shared_legs
    REGIONS=$(($(sectors "${LEGS[0]}") / REGION_SECTORS))
    marks=$(marks_in_state)
    record "marked_at_cut_count" "${marks%% *}"
    record "marked_at_cut" "${marks#* }"
    if [ "$NODE" = 1 ]; then
        diff=$(legs_diff_regions)
        record "legs_diff_at_cut_count" "${diff%% *}"
        record "legs_diff_at_cut" "${diff#* }"
    fi
    line_start=$(wc -l <"$SOUT/daemon.log")
    cluster_daemon
    barrier daemons
    create_mirror "$NAME" "0 $(sectors "${LEGS[0]}") mirror userspace 3 $UUID clustered-core $REGION_SECTORS 2 ${LEGS[0]} 0 ${LEGS[1]} 0"
    wait_sync "$NAME" 240
    check "sync_final" "$SYNC_STATUS" "$REGIONS/$REGIONS"
    barrier synced
    resynced=$(recovered_regions "$line_start")
    record "resynced_boot2" "$(count_list "$resynced")"
    record "resynced_boot2_regions" "${resynced:-none}"
    record "rebooted_logged" "$(tail -n +"$((line_start + 1))" "$SOUT/daemon.log" | grep -c 'a node booted again')"
    record "status_final" "$(dm_status "$NAME")"
    check "health_final" "$(dm_status "$NAME" | awk '{ print $(7 + $4) }')" "AA"
    barrier checked
    remove_mirror "$NAME"
    stop_daemon
}

main_scenario power-cut
