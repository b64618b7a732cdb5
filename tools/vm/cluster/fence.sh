#!/bin/bash
# dm-ulogd --fence-command of the two-guest scenarios; $1 is the departed node's id.
#
# The fence itself is the host's: it SIGKILLs the node's qemu, and only then writes the node's id to
# the survivor's results share ($FENCE_OUT/peer-killed). This script exits 0 once that file names the
# node (the node can no longer write to the shared legs), 1 if it does not within 60 s (dm-ulogd
# retries): a node that corosync lost while its qemu still runs (a membership flap under load) is
# never called fenced here. Before answering it records the cluster state as this node has it now
# (ulog-recover list --json: the departed node's regions, held for this fence), which is what the
# survivor's log said at the death.
node=$1
t0=$SECONDS
cut -d' ' -f1 /proc/uptime >"$FENCE_OUT/fence-$node.start-uptime"
until grep -qx "$node" "$FENCE_OUT/peer-killed" 2>/dev/null; do
    ((SECONDS - t0 > 60)) && { echo "fence: node $node not killed by the host within 60 s" >&2; exit 1; }
    sleep 0.2
done
"$PY" -m ulog_disk.tools.recover list --state-dir "$FENCE_STATE" --json >"$FENCE_OUT/fence-$node.json" \
    2>"$FENCE_OUT/fence-$node.err"
cut -d' ' -f1 /proc/uptime >"$FENCE_OUT/fence-$node.uptime"
exit 0
