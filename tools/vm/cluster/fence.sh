#!/bin/bash
# dm-ulogd --fence-command of the two-guest scenarios; $1 is the departed node's id.
#
# The fence itself is the host's: it SIGKILLs the node's qemu, and only then writes the node's id to
# the survivor's results share ($FENCE_OUT/peer-killed). This script exits 0 once that file names the
# node (the node can no longer write to the shared legs), 1 if it does not within 60 s (dm-ulogd
# retries): a node that corosync lost while its qemu still runs (a membership flap under load) is
# never called fenced here. Shell only, no python start: under emulation on a loaded host a
# `ulog-recover list` here took 37-60 s, all of it added to the fence (the scenario reads the cluster
# state after the fence instead).
node=$1
t0=$SECONDS
cut -d' ' -f1 /proc/uptime >"$FENCE_OUT/fence-$node.start-uptime"
until grep -qx "$node" "$FENCE_OUT/peer-killed" 2>/dev/null; do
    ((SECONDS - t0 > 60)) && { echo "fence: node $node not killed by the host within 60 s" >&2; exit 1; }
    sleep 0.2
done
cut -d' ' -f1 /proc/uptime >"$FENCE_OUT/fence-$node.uptime"
exit 0
