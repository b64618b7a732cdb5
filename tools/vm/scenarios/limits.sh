#!/bin/bash
# The daemon under a descriptor limit and a memory limit: started with
# `ulimit -n 64` and in a cgroup whose memory.max is MEMORY_MAX (default 96M), it serves
# LIMIT_MIRRORS mirrors (default 24; a daemon that kept 4 descriptors per mirror would stop at
# 16), then a mirror whose bitmaps cannot fit under the memory limit (2^28 regions over dm `error`
# legs: about 128 MiB of bitmaps and copies). That one must fail its CTR (dmsetup create fails,
# ENOMEM) with one daemon log line naming the limit; every other mirror keeps working (writes,
# status); the daemon is never OOM-killed; nothing is lost (a kill -9 and a restart under the
# same limits: every mirror goes on, nothing resyncs, legs identical).
#
# Result keys (limits.*): mirrors_working, huge_create_rc, memory_limit_lines, oom_kills,
# daemon_fds, daemon_rss_kib, resync_after_restart.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

LIMIT_CG=/sys/fs/cgroup/ulog-limits
SLICE_SECTORS=2048  # 1 MiB per leg per mirror
SLICE_REGION=128    # 16 regions per mirror

# limits_cgroup: a cgroup v2 group with memory.max = MEMORY_MAX.
limits_cgroup() {
    if [ ! -f /sys/fs/cgroup/cgroup.controllers ]; then
        mount -t cgroup2 none /sys/fs/cgroup || die "cannot mount cgroup2"
    fi
    grep -qw memory /sys/fs/cgroup/cgroup.controllers || die "no memory controller in cgroup2"
    echo +memory >/sys/fs/cgroup/cgroup.subtree_control || die "cannot enable the memory controller"
    mkdir -p "$LIMIT_CG"
    echo "${MEMORY_MAX:-96M}" >"$LIMIT_CG/memory.max" || die "cannot set memory.max"
    record "memory_max" "$(cat "$LIMIT_CG/memory.max")"
}

# start_limited_daemon: the daemon with RLIMIT_NOFILE 64 (soft and hard), moved into the cgroup
# before it reads its first request (its start-up memory stays charged where it was: the limit is
# enforced on what it allocates from then on, and the daemon's own check uses its RSS).
start_limited_daemon() {
    local saved
    saved=$(ulimit -Hn)
    ulimit -n 64
    start_daemon
    ulimit -Hn "$saved"
    ulimit -Sn "$saved"
    echo "$DAEMON_PID" >"$LIMIT_CG/cgroup.procs" || die "cannot move the daemon into $LIMIT_CG"
    record "daemon_nofile" "$(awk '/Max open files/ { print $4 "/" $5 }' "/proc/$DAEMON_PID/limits")"
}

# slice_legs I: two dm linear slices (one per loop device) for mirror I; sets SLICES.
slice_legs() {
    local i=$1 leg
    SLICES=()
    for leg in 0 1; do
        timeout 60 dmsetup --noudevsync create "ulog-lim-$i-$leg" \
            --table "0 $SLICE_SECTORS linear ${LEGS[$leg]} $((i * SLICE_SECTORS))" || die "cannot create slice $i/$leg"
        SLICES+=("/dev/mapper/ulog-lim-$i-$leg")
    done
    dmsetup mknodes
}

scenario_limits() {
    local n=${LIMIT_MIRRORS:-24} i ok=0 t rc before
    make_legs 2 $(((n * SLICE_SECTORS / 2048) + 1))
    limits_cgroup
    start_limited_daemon
    for ((i = 0; i < n; i++)); do
        slice_legs "$i"
        t="0 $SLICE_SECTORS mirror userspace 3 ulogvm-limits-$i clustered-core $SLICE_REGION 2 ${SLICES[0]} 0 ${SLICES[1]} 0"
        timeout 60 dmsetup --noudevsync create "ulog-lim-$i" --table "$t" >/dev/null 2>&1 \
            || { fail "mirror $i: create failed"; continue; }
        MIRRORS+=("ulog-lim-$i")
    done
    dmsetup mknodes
    for ((i = 0; i < n; i++)); do await_sync "ulog-lim-$i" 120; done
    record "resync_initial" "$(resync_count)"
    # The mirror that does not fit: 2^28 regions of 8 sectors over dm `error` legs (1 TiB; dm-mirror
    # asks the log first, so the legs are never read).
    timeout 60 dmsetup --noudevsync create ulog-lim-zero0 --table "0 $((1 << 31)) error" &&
        timeout 60 dmsetup --noudevsync create ulog-lim-zero1 --table "0 $((1 << 31)) error" || die "no legs for the mirror that does not fit"
    dmsetup mknodes
    timeout 120 dmsetup --noudevsync create ulog-lim-huge --table \
        "0 $((1 << 31)) mirror userspace 3 ulogvm-limits-huge clustered-core 8 2 /dev/mapper/ulog-lim-zero0 0 /dev/mapper/ulog-lim-zero1 0" \
        >"$SOUT/huge-create.txt" 2>&1
    rc=$?
    [ "$rc" = 0 ] && MIRRORS+=(ulog-lim-huge)
    check_re "huge_create_rc" "$rc" '^[1-9][0-9]*$'
    check "memory_limit_lines" "$(grep -c 'refused: a log of 268435456 regions needs about .* memory limit' "$SOUT/daemon.log")" 1
    kill -0 "$DAEMON_PID" 2>/dev/null || die "the daemon died"
    check "oom_kills" "$(awk '$1 == "oom_kill" { print $2 }' "$LIMIT_CG/memory.events")" 0
    # Every other mirror still works: a write reaches both legs, the status answers.
    for ((i = 0; i < n; i++)); do
        dd if=/dev/urandom of="/dev/mapper/ulog-lim-$i" bs=64K count=4 seek=$((i % 8)) oflag=direct \
            conv=notrunc status=none 2>>"$SOUT/writes.log" && [ -n "$(dm_status "ulog-lim-$i")" ] && ok=$((ok + 1))
    done
    check "mirrors_working" "$ok" "$n"
    record "daemon_fds" "$(ls "/proc/$DAEMON_PID/fd" | wc -l)"
    record "daemon_rss_kib" "$(awk '/VmRSS/ { print $2 }' "/proc/$DAEMON_PID/status")"
    # Nothing lost: kill -9, restart under the same limits; writes go on, nothing resyncs.
    before=$(resync_count)
    kill9_daemon
    start_limited_daemon
    ok=0
    for ((i = 0; i < n; i++)); do
        dd if=/dev/urandom of="/dev/mapper/ulog-lim-$i" bs=64K count=2 seek=$((8 + i % 7)) oflag=direct \
            conv=notrunc status=none 2>>"$SOUT/writes.log" && ok=$((ok + 1))
    done
    check "mirrors_working_after_restart" "$ok" "$n"
    for ((i = 0; i < n; i++)); do await_sync "ulog-lim-$i" 60; done
    check "resync_after_restart" "$(($(resync_count) - before))" 0
    ok=0
    for ((i = 0; i < n; i++)); do
        drop_leg_caches
        cmp -s "/dev/mapper/ulog-lim-$i-0" "/dev/mapper/ulog-lim-$i-1" && ok=$((ok + 1))
    done
    check "legs_identical" "$ok" "$n"
    for ((i = 0; i < n; i++)); do remove_mirror "ulog-lim-$i" >/dev/null; done
    stop_daemon
    for ((i = 0; i < n; i++)); do
        timeout 30 dmsetup --noudevsync remove "ulog-lim-$i-0" "ulog-lim-$i-1" >/dev/null 2>&1
    done
    timeout 30 dmsetup --noudevsync remove ulog-lim-zero0 ulog-lim-zero1 >/dev/null 2>&1
}

main_scenario limits
