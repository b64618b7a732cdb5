# shellcheck shell=bash
# Helpers of the two-guest scenarios (tools/vm/cluster2.py run SCENARIO), on top of the single-guest
# ones (tools/vm/scenarios/lib.sh: log, record, check, start_listener, create_mirror, dm_status, ...).
#
# Set by cluster2.py (scenario-env.sh): NODE (this guest's corosync node id, 1 or 2), NODES (2),
# BACKEND, REGION_SECTORS, TOKEN_MS. Disks: `state` (this guest's own), `leg0` and `leg1` (shared by
# both guests: the same raw images on the host).
# shellcheck source=../scenarios/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scenarios/lib.sh"

CLUSTER_DIR=$ULOG_CHECKOUT/tools/vm/cluster
NODE=${NODE:?NODE not set}
NODES=${NODES:-2}
TOKEN_MS=${TOKEN_MS:-3000}
NET=10.77.0
COROSYNC_PID=
WRITER_PY_PID=

# net_up: this guest's address on the link between the two qemu processes (nothing else is on it).
net_up() {
    local dev
    ip link set lo up
    dev=$(ls /sys/class/net | grep -v '^lo$' | head -1)
    [ -n "$dev" ] || die "no network device (virtio_net loaded? $(ls /sys/class/net))"
    ip addr add "$NET.$NODE/24" dev "$dev" || die "ip addr add on $dev failed"
    ip link set "$dev" up || die "ip link set $dev up failed"
    log "network: $dev $NET.$NODE/24"
}

# corosync_up: corosync with both nodes, two_node (quorate alone once both have been seen), waits
# until this node is quorate, i.e. has seen the other (wait_for_all).
corosync_up() {
    local conf=/run/corosync/corosync.conf i nodes="" t0 next=$((SECONDS + PROGRESS_EVERY))
    mkdir -p /run/corosync/state
    for ((i = 1; i <= NODES; i++)); do
        nodes="$nodes    node {
        ring0_addr: $NET.$i
        nodeid: $i
        name: n$i
    }
"
    done
    cat >"$conf" <<EOF
totem {
    version: 2
    cluster_name: ulogvm2
    transport: knet
    token: $TOKEN_MS
    crypto_cipher: none
    crypto_hash: none
}
nodelist {
$nodes}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_logfile: yes
    logfile: $SOUT/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: hires
}
system {
    state_dir: /run/corosync/state
}
EOF
    t0=$(now)
    corosync -f -c "$conf" >"$SOUT/corosync.out" 2>&1 </dev/null &
    COROSYNC_PID=$!
    until corosync-quorumtool -s 2>/dev/null | grep -q '^Quorate: *Yes'; do
        kill -0 "$COROSYNC_PID" 2>/dev/null || { cat "$SOUT/corosync.out"; die "corosync exited"; }
        if awk -v e="$(elapsed "$t0")" 'BEGIN { exit !(e > 180) }'; then
            corosync-quorumtool -s >"$SOUT/quorumtool.txt" 2>&1
            die "corosync not quorate after 180 s (the other node not seen; $SOUT/quorumtool.txt)"
        fi
        if ((SECONDS >= next)); then
            log "waiting for corosync to see the other node ($(elapsed "$t0") s)"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.3
    done
    record "corosync_quorate_seconds" "$(elapsed "$t0")"
    corosync-quorumtool -s >"$SOUT/quorumtool.txt" 2>&1
}

# state_disk_up: this guest's own disk `state`, ext4 (made in boot 1), mounted; sets STATE (the daemon's state
# directory on it).
state_disk_up() {
    local dev mnt=$WORK/statedisk
    dev=$(disk_dev state) || die "no disk 'state'"
    # Made in the first boot; a later boot mounts what the power cut left (ext4 replays its journal).
    if [ "$BOOT" = 1 ]; then
        mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev" || die "mkfs.ext4 $dev failed"
    fi
    mkdir -p "$mnt"
    mount -t ext4 "$dev" "$mnt" || die "cannot mount $dev"
    STATE=$mnt/state
    mkdir -p "$STATE"
}

# cluster_daemon: dm-ulogd --cluster corosync on the netlink connector, its fence command the host's
# kill (fence.sh).
cluster_daemon() {
    export FENCE_OUT=$OUT
    start_listener "$SOUT/ready" "$SOUT/daemon.log" "$PY" -m ulog_disk --listen netlink --cluster corosync \
        --state-dir "$STATE" --backend "$BACKEND" --ready-file "$SOUT/ready" --capture "$SOUT/capture.bin" \
        --fence-command "$CLUSTER_DIR/fence.sh" -v
}

# shared_legs: LEGS = the two shared disks, in the same order on both guests.
shared_legs() {
    local d dev
    LEGS=()
    for d in leg0 leg1; do
        dev=$(disk_dev "$d") || die "no disk '$d'"
        LEGS+=("$dev")
    done
    log "shared legs: ${LEGS[*]}"
}

# recovered_regions [FROM_LINE]: the regions this node's daemon recovered (its log's "recovers
# region" lines after line FROM_LINE), in order, comma-separated ("" if none).
recovered_regions() {
    tail -n +"$((${1:-0} + 1))" "$SOUT/daemon.log" | sed -n 's/.* recovers region \([0-9]*\)$/\1/p' | paste -sd,
}

# count_list LIST: the number of items in a comma-separated list.
count_list() { [ -z "$1" ] && echo 0 || awk -F, '{ print NF }' <<<"$1"; }

# start_writer NAME: the O_DIRECT writer (writer.py) on /dev/mapper/NAME; its count of writes in
# $SOUT/writer.count (the host reads it through the share).
start_writer() {
    WRITER_STOP_FILE=$WORK/$SCEN-writer.stop
    rm -f "$WRITER_STOP_FILE" "$SOUT/writer.count"
    # niced: under emulation four writer threads would otherwise take the CPU the daemon and
    # corosync need (seen: a 60 s python start in the fence command).
    nice -n 10 "$PY" "$CLUSTER_DIR/writer.py" "/dev/mapper/$1" --node "$NODE" --region-bytes "$((REGION_SECTORS * 512))" \
        --count-file "$SOUT/writer.count" --stop-file "$WRITER_STOP_FILE" >"$SOUT/writer.log" 2>&1 &
    WRITER_PY_PID=$!
}

# writes_done: the writes the writer has finished so far.
writes_done() {
    local n=
    read -r n 2>/dev/null <"$SOUT/writer.count"
    [[ $n =~ ^[0-9]+$ ]] && echo "$n" || echo 0
}

# wait_more_writes N [LIMIT]: wait until the writer has done N more writes (a failed check after LIMIT s).
wait_more_writes() {
    local want t0=$SECONDS next=$((SECONDS + PROGRESS_EVERY)) n
    want=$(($(writes_done) + $1))
    while n=$(writes_done); [ "$n" -lt "$want" ]; do
        kill -0 "$WRITER_PY_PID" 2>/dev/null || { fail "the writer ended at $n writes, before $want"; return 1; }
        ((SECONDS - t0 > ${2:-120})) && { fail "the writer did $n writes, not $want, in ${2:-120}s"; return 1; }
        if ((SECONDS >= next)); then
            log "waiting for the writer: $n writes of $want"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.2
    done
}

# stop_writer: stop the writer after its writes in flight; records writes_total.
stop_writer() {
    : >"$WRITER_STOP_FILE"
    wait "$WRITER_PY_PID"
    record "writer_rc" "$?"
    WRITER_PY_PID=
    record "writes_total" "$(writes_done)"
}

# wait_log PATTERN LIMIT: wait until the daemon log has a line matching PATTERN (grep -E); prints
# its line number; status 1 after LIMIT s.
wait_log() {
    local t0=$SECONDS next=$((SECONDS + PROGRESS_EVERY)) n
    while :; do
        n=$(grep -nE "$1" "$SOUT/daemon.log" | head -1 | cut -d: -f1)
        [ -n "$n" ] && { echo "$n"; return 0; }
        ((SECONDS - t0 > $2)) && return 1
        if ((SECONDS >= next)); then
            log "waiting for the daemon to log /$1/ ($((SECONDS - t0)) s)" >&2
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.2
    done
}

# barrier NAME [LIMIT]: wait until every guest has reached barrier NAME (the host, seeing
# barrier-NAME.reached in every guest's share, writes barrier-NAME.go into each); die after LIMIT s
# (default 300).
barrier() {
    local t0=$SECONDS next=$((SECONDS + PROGRESS_EVERY))
    : >"$OUT/barrier-$1.reached"
    until [ -e "$OUT/barrier-$1.go" ]; do
        ((SECONDS - t0 > ${2:-300})) && die "barrier $1: the other node not there after ${2:-300} s"
        if ((SECONDS >= next)); then
            log "waiting for the other node at barrier $1 ($((SECONDS - t0)) s)"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.2
    done
    log "barrier $1 passed"
}

# cluster_mirror_up UUID NAME: network, corosync, the state disk, dm-ulogd and the mirror on the shared
# legs (REGION_SECTORS regions; leg 1 behind dm-delay on node SLOW_LEG, or on both with SLOW_LEG=all),
# waits for the first resync; sets REGIONS and records what this node recovered of it.
cluster_mirror_up() {
    local uuid=$1 name=$2 sectors table first
    net_up
    corosync_up
    state_disk_up
    cluster_daemon
    shared_legs
    sectors=$(sectors "${LEGS[0]}")
    if [ "${SLOW_LEG:-}" = "$NODE" ] || [ "${SLOW_LEG:-}" = all ]; then
        # This node's writes reach leg 1 DELAY_MS late (dm-delay in front of it, this node only): at
        # a kill its writes in flight are marked, on leg 0 and not yet on leg 1, so the death leaves
        # the legs different in regions it held marked, and the resync has something to do.
        dmsetup --noudevsync create "n$NODE-leg1-slow" \
            --table "0 $sectors delay ${LEGS[1]} 0 0 ${LEGS[1]} 0 ${DELAY_MS:-400}" || die "dm-delay failed"
        dmsetup mknodes "n$NODE-leg1-slow"
        LEGS[1]=/dev/mapper/n$NODE-leg1-slow
        log "leg 1 behind dm-delay here: writes ${DELAY_MS:-400} ms late"
    fi
    REGIONS=$((sectors / REGION_SECTORS))
    record "regions" "$REGIONS"
    table="0 $sectors mirror userspace 3 $uuid clustered-core $REGION_SECTORS 2 ${LEGS[0]} 0 ${LEGS[1]} 0"
    create_mirror "$name" "$table"
    wait_sync "$name" 300
    check "sync_initial" "$SYNC_STATUS" "$REGIONS/$REGIONS"
    first=$(recovered_regions)
    record "resynced_initial" "$(count_list "$first")"
    record "resynced_initial_regions" "${first:-none}"
}

cluster_cleanup() {
    [ -n "${WRITER_STOP_FILE:-}" ] && : >"$WRITER_STOP_FILE"
    cleanup
    [ -n "$COROSYNC_PID" ] && kill -TERM "$COROSYNC_PID" 2>/dev/null
    grep -q " $WORK/statedisk " /proc/mounts && umount "$WORK/statedisk" 2>/dev/null
    return 0
}
