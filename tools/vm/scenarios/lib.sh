# shellcheck shell=bash
# Helpers for the scenarios run inside the ulogvm guest (tools/vm/ulogvm.py run SCENARIO).
#
# The guest runs this chrooted into the host's root (read-only 9p), with tmpfs on /tmp and /run, the
# checkout mounted at its own absolute path (read-only), and these variables set by the harness:
#   ULOG_CHECKOUT  the project checkout          ULOG_OUT  writable results directory (9p share)
#   PY             python to run the daemon with ULOG_SCENARIO  the scenario being run
#   ULOG_BOOT      this boot's number (1..ULOG_BOOTS; several with `ulogvm.py run --boots N`)
#
# Conventions:
#   * A scenario file NAME.sh defines a function scenario_NAME (dashes -> underscores) and ends with
#     `main_scenario NAME`, which runs it only when the file is executed (not when a suite sources it).
#   * run_scenario NAME runs scenario_NAME in a subshell with its own directory $SOUT = $ULOG_OUT/NAME;
#     all result keys are written to $ULOG_OUT/result.txt as "NAME.key=value".
#   * `check KEY ACTUAL EXPECTED` records KEY=ACTUAL and marks the scenario failed on a mismatch;
#     `record KEY VALUE` only records; `die MSG` stops the scenario.
#   * A scenario's exit code is 0 only if every check passed; a suite's is 0 only if all passed.

set -u

OUT=${ULOG_OUT:?ULOG_OUT not set}
# Extra variables given with `ulogvm.py run --env K=V` (e.g. BACKEND=memory).
# shellcheck disable=SC1091
[ -f "$OUT/scenario-env.sh" ] && source "$OUT/scenario-env.sh"
: "${ULOG_CHECKOUT:?ULOG_CHECKOUT not set}"
PY=${PY:-python3}
RESULT=$OUT/result.txt
WORK=${WORK:-/tmp/ulog}
BACKEND=${BACKEND:-lmdb}
STATE=${STATE:-$WORK/state}
SCENARIO_DIR=$ULOG_CHECKOUT/tools/vm/scenarios
BOOT=${ULOG_BOOT:-1}
export PYTHONPATH=$ULOG_CHECKOUT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

SCEN=${SCEN:-${ULOG_SCENARIO:-unknown}}
SOUT=${SOUT:-$OUT/$SCEN}
FAILED=0
LEGS=()          # loop devices created by make_legs (leg 0, leg 1, ...)
LEG_FILES=()
LOGDEV=          # loop device for a clustered-disk log (make_logdev)
DAEMON_PID=
DAEMON_STARTS=0
MIRRORS=()       # dm devices created by create_mirror, removed by cleanup

now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[$(now)] $SCEN: $*"; }
record() { echo "$SCEN.$1=$2" >>"$RESULT"; log "$1=$2"; }
fail() { FAILED=1; record "failed" "$*"; log "CHECK FAILED: $*"; }
die() { fail "$*"; exit 1; }

# check KEY ACTUAL EXPECTED: record and compare (exact string match).
check() {
    record "$1" "$2"
    [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"
}

# check_re KEY ACTUAL REGEX: record and match an extended regular expression (whole string).
check_re() {
    record "$1" "$2"
    [[ $2 =~ ^$3$ ]] || fail "$1: '$2' does not match /^$3\$/"
}

# elapsed START: seconds since START (a value of $(now)), one decimal.
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Waits that can last long (sync, writer, daemon start) log a line every PROGRESS_EVERY seconds of
# bash's SECONDS clock: the host streams the console, and a silent wait looks like a hang.
PROGRESS_EVERY=3

# run_scenario NAME: run scenario_NAME in a subshell; returns its status.
run_scenario() {
    local name=$1 fn=scenario_${1//-/_} t0 rc
    t0=$(now)
    mkdir -p "$OUT/$name"
    (
        SCEN=$name SOUT=$OUT/$name FAILED=0 STATE=$WORK/state/$name
        trap cleanup EXIT
        echo "ulogvm: scenario $name start" >/dev/kmsg 2>/dev/null
        log "start"
        "$fn"
        exit "$FAILED"
    )
    rc=$?
    echo "$name.rc=$rc" >>"$RESULT"
    echo "$name.seconds=$(elapsed "$t0")" >>"$RESULT"
    echo "[$(now)] $name: finished rc=$rc in $(elapsed "$t0")s"
    return "$rc"
}

# main_scenario NAME: run the scenario if this file is executed, not sourced by a suite.
main_scenario() {
    if [ -z "${ULOG_IN_SUITE:-}" ]; then
        run_scenario "$1"
        exit $?
    fi
}

# run_suite NAME...: source NAME.sh and run scenario_NAME for each, in this boot; returns non-zero if
# any failed. The suite's own result keys: suite.failed=<names>.
run_suite() {
    local name rc=0 failed=""
    export ULOG_IN_SUITE=1
    for name in "$@"; do
        # shellcheck disable=SC1090
        source "$SCENARIO_DIR/$name.sh"
    done
    for name in "$@"; do
        run_scenario "$name" || { rc=1; failed="$failed $name"; }
    done
    echo "suite.failed=${failed# }" >>"$RESULT"
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Block devices

# make_legs N SIZE_MIB: N loop devices over files in tmpfs; sets LEGS and LEG_FILES.
make_legs() {
    local n=$1 mib=$2 i f dev
    mkdir -p "$WORK/legs"
    for ((i = 0; i < n; i++)); do
        f=$WORK/legs/$SCEN-leg$i.img
        # Different contents per leg so that "identical" proves the resync copied data.
        dd if=/dev/urandom of="$f" bs=1M count="$mib" status=none || die "cannot create $f"
        dev=$(losetup -f --show "$f") || die "losetup $f failed"
        LEGS+=("$dev")
        LEG_FILES+=("$f")
    done
    log "legs: ${LEGS[*]}"
}

# make_logdev SIZE_MIB: one zeroed loop device for a clustered-disk log; sets LOGDEV.
make_logdev() {
    local f=$WORK/legs/$SCEN-log.img
    mkdir -p "$WORK/legs"
    dd if=/dev/zero of="$f" bs=1M count="$1" status=none || die "cannot create $f"
    LOGDEV=$(losetup -f --show "$f") || die "losetup $f failed"
    log "log device: $LOGDEV"
}

# devno DEV: major:minor of a block device.
devno() { printf '%d:%d' "0x$(stat -c %t "$1")" "0x$(stat -c %T "$1")"; }

# sectors DEV: size in 512-byte sectors.
sectors() { blockdev --getsz "$1"; }

# drop_leg_caches: forget cached pages of the legs. The mirror writes to the legs with bios that do
# not go through the legs' own page cache, so a buffered read of a leg can return what an earlier read
# cached: without this, cmp may call stale copies equal.
drop_leg_caches() {
    local dev
    sync
    for dev in "${LEGS[@]}"; do blockdev --flushbufs "$dev"; done
    echo 3 >/proc/sys/vm/drop_caches
}

# cmp_legs: "equal" if every leg equals leg 0, else "differ".
cmp_legs() {
    local i
    drop_leg_caches
    for ((i = 1; i < ${#LEGS[@]}; i++)); do
        cmp -s "${LEGS[0]}" "${LEGS[$i]}" || { echo differ; return; }
    done
    echo equal
}

# diff_regions REGION_BYTES REGIONS: "COUNT RANGES" of the regions in which leg 0 and leg 1 differ
# ("0 none" if none), reading the legs themselves (not the mirror).
diff_regions() {
    drop_leg_caches
    # Equal legs (the usual case) cost one cmp; a region-by-region comparison costs a python start,
    # but `cmp -l | awk` over 4 differing regions is 2 million lines: 27 s under emulation.
    if cmp -s "${LEGS[0]}" "${LEGS[1]}"; then
        echo "0 none"
        return
    fi
    "$PY" - "${LEGS[0]}" "${LEGS[1]}" "$1" "$2" <<'EOF'
import sys

a, b = open(sys.argv[1], "rb"), open(sys.argv[2], "rb")
size, count = int(sys.argv[3]), int(sys.argv[4])
diff = [r for r in range(count) if a.read(size) != b.read(size)]
runs = []
for r in diff:
    if runs and runs[-1][1] == r - 1:
        runs[-1][1] = r
    else:
        runs.append([r, r])
print(len(diff), ",".join(f"{s}" if s == e else f"{s}-{e}" for s, e in runs) or "none")
EOF
}

# count_diff_regions REGION_SECTORS: number of regions in which leg 0 and leg 1 differ.
count_diff_regions() {
    local d
    d=$(diff_regions "$(($1 * 512))" "$(($(sectors "${LEGS[0]}") / $1))")
    echo "${d%% *}"
}

# disk_dev NAME: the guest's block device of the run's virtual disk NAME (`ulogvm.py run --disk
# NAME:SIZE`, a virtio-blk device with serial number NAME); nothing and status 1 if there is none.
disk_dev() {
    local f
    for f in /sys/block/vd*/serial; do
        [ -r "$f" ] && [ "$(cat "$f")" = "$1" ] && { echo "/dev/$(basename "$(dirname "$f")")"; return 0; }
    done
    return 1
}

# crash_guest [CMD...]: crash the guest kernel at once (sysrq c): nothing is flushed, as in a power
# cut, and qemu ends (panic=-1, -no-reboot). The marker file tells the harness the crash is intended;
# it then boots the next boot of the run (`--boots N`) on the same disks. CMD (e.g. a function that
# waits for writes in flight) runs last, just before the crash. What the scenario wrote to $OUT
# before is on the host already (9p); do not `sync` before calling this unless that is the point.
crash_guest() {
    dmesg >"$SOUT/dmesg.boot$BOOT.txt" 2>/dev/null
    echo "$BOOT" >"$OUT/crash-intended"
    echo 1 >/proc/sys/kernel/sysrq
    [ $# -gt 0 ] && "$@"
    record "crash_uptime" "$(now)"
    echo c >/proc/sysrq-trigger
    sleep 10
    die "the guest still runs 10 s after sysrq c"
}

# ---------------------------------------------------------------------------------------------
# The daemon (or any listener on the netlink connector)

# start_listener READY_FILE LOG_FILE CMD...: start CMD in the background, wait for READY_FILE.
start_listener() {
    local ready=$1 logf=$2 t0 i next=$((SECONDS + PROGRESS_EVERY))
    shift 2
    rm -f "$ready"
    DAEMON_STARTS=$((DAEMON_STARTS + 1))
    echo "=== start $DAEMON_STARTS at uptime $(now): $*" >>"$logf"
    t0=$(now)
    # DAEMON_DIR: another checkout whose ulog_disk to run (the upgrade scenario's previous release).
    (cd "${DAEMON_DIR:-$ULOG_CHECKOUT}" && exec "$@") 2>>"$logf" >>"$logf" </dev/null &
    DAEMON_PID=$!
    for ((i = 0; i < 300; i++)); do
        [ -e "$ready" ] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || { tail -20 "$logf"; die "listener exited before ready"; }
        if ((SECONDS >= next)); then
            log "waiting for the daemon to be ready ($(elapsed "$t0") s; python starts slowly under emulation)"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.1
    done
    [ -e "$ready" ] || { tail -20 "$logf"; die "listener not ready after 30 s"; }
    record "ready_seconds_$DAEMON_STARTS" "$(elapsed "$t0")"
}

# start_daemon [EXTRA ARGS]: start dm-ulogd on the netlink connector. Capture files are numbered per
# start: capture.bin, capture.2.bin, ... With ULOG_DAEMON=smoke the stand-alone smoke listener is
# started instead (to check the scenarios themselves; it keeps no state across restarts).
# shellcheck disable=SC2120  # extra arguments are for scenarios that need them
start_daemon() {
    local cap=$SOUT/capture.bin
    [ "$DAEMON_STARTS" -gt 0 ] && cap=$SOUT/capture.$((DAEMON_STARTS + 1)).bin
    mkdir -p "$STATE"
    if [ "${ULOG_DAEMON:-}" = smoke ]; then
        # Harness self-check: run the daemon scenarios against the stand-alone listener instead.
        start_listener "$SOUT/ready" "$SOUT/daemon.log" "$PY" "$ULOG_CHECKOUT/tools/vm/smoke_listener.py" \
            --ready-file "$SOUT/ready" --capture "$cap" --trace "$SOUT/trace.txt"
        return
    fi
    start_listener "$SOUT/ready" "$SOUT/daemon.log" "$PY" -m ulog_disk --listen netlink \
        --state-dir "$STATE" --backend "$BACKEND" --capture "$cap" --ready-file "$SOUT/ready" -v "$@"
}

# stop_daemon: SIGTERM and wait (≤ 20 s); checks that the exit status (stop_rc_N) is 0.
stop_daemon() {
    local i rc
    [ -n "$DAEMON_PID" ] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null
    for ((i = 0; i < 200; i++)); do
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -KILL "$DAEMON_PID"
        fail "daemon did not stop within 20 s of SIGTERM"
    fi
    wait "$DAEMON_PID"
    rc=$?
    check "stop_rc_$DAEMON_STARTS" "$rc" 0
    DAEMON_PID=
    return 0
}

# kill9_daemon: SIGKILL, no clean-up by the daemon.
kill9_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    kill -KILL "$DAEMON_PID"
    wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=
    log "daemon killed with SIGKILL"
}

# resync_count: number of "resync region" lines in the daemon log so far.
resync_count() { grep -c 'resync region' "$SOUT/daemon.log" 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------
# Mirrors

# mirror_table SECTORS UUID LOGTYPE REGION_SIZE [integrated_flush]: the table line for LEGS (and LOGDEV
# for clustered-disk).
mirror_table() {
    local sectors=$1 uuid=$2 type=$3 rs=$4 flags=${5:-} args legs="" dev
    args="$uuid"
    [ -n "$flags" ] && args="$args $flags"
    args="$args $type"
    [ "$type" = clustered-disk ] && args="$args $LOGDEV"
    args="$args $rs"
    for dev in "${LEGS[@]}"; do legs="$legs $dev 0"; done
    # shellcheck disable=SC2086
    set -- $args
    echo "0 $sectors mirror userspace $# $args ${#LEGS[@]}$legs"
}

# create_mirror NAME TABLE: dmsetup create (no udev) + mknodes; records create_rc / create_seconds.
create_mirror() {
    local name=$1 table=$2 t0 rc
    log "create $name: $table"
    t0=$(now)
    timeout 60 dmsetup --noudevsync create "$name" --table "$table"
    rc=$?
    record "create_seconds" "$(elapsed "$t0")"
    check "create_rc" "$rc" 0
    [ "$rc" = 0 ] || die "dmsetup create $name failed"
    MIRRORS+=("$name")
    dmsetup mknodes "$name"
    [ -b "/dev/mapper/$name" ] || die "/dev/mapper/$name is not a block device after mknodes"
}

# dm_status NAME / dm_table NAME: one line, with a timeout (a dead daemon can block status forever).
dm_status() { timeout 30 dmsetup status "$1"; }
dm_table() { timeout 30 dmsetup table "$1"; }

# sync_field NAME: the "<in sync>/<regions>" field of the mirror status.
sync_field() { dm_status "$1" | awk '{ print $(5 + $4) }'; }

# await_sync NAME TIMEOUT: poll until in-sync == regions (a line every PROGRESS_EVERY s; a failed
# check after TIMEOUT s); sets SYNC_STATUS (the last "<in sync>/<regions>") and SYNC_SECONDS.
await_sync() {
    local name=$1 limit=$2 t0 s="" next=$((SECONDS + PROGRESS_EVERY))
    t0=$(now)
    while :; do
        s=$(sync_field "$name")
        [ -n "$s" ] && [ "${s%/*}" = "${s#*/}" ] && break
        if awk -v e="$(elapsed "$t0")" -v l="$limit" 'BEGIN { exit !(e > l) }'; then
            fail "$name not in sync after ${limit}s (status: $s)"
            break
        fi
        if ((SECONDS >= next)); then
            log "waiting for $name to sync: ${s:-?} regions in sync after $(elapsed "$t0") s"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.5
    done
    SYNC_STATUS=$s
    SYNC_SECONDS=$(elapsed "$t0")
}

# wait_recovered NAME [LIMIT]: wait until the mirror's recovery pass has found every region in sync:
# dm-raid1 raises the table's first event then (`dmsetup wait NAME 0` returns; seen: 0 events while
# a region is out of sync, 1 at once for a mirror created in sync), and starts no resync after it
# until the next resume. What a check that "nothing resyncs" waits for (a failed check after LIMIT s,
# default 60).
wait_recovered() {
    local t0
    t0=$(now)
    timeout "${2:-60}" dmsetup wait "$1" 0 >/dev/null ||
        fail "$1: its recovery pass found it in sync not within ${2:-60}s (status: $(sync_field "$1"))"
    log "$1: in sync after the kernel's recovery pass ($(elapsed "$t0") s)"
}

# wait_sync NAME TIMEOUT: await_sync, then records sync and sync_seconds.
wait_sync() {
    await_sync "$1" "$2"
    record "sync" "$SYNC_STATUS"
    record "sync_seconds" "$SYNC_SECONDS"
}

# remove_mirror NAME: dmsetup remove with a timeout; records remove_rc.
remove_mirror() {
    local name=$1 rc i
    timeout 60 dmsetup --noudevsync remove "$name"
    rc=$?
    check "remove_rc" "$rc" 0
    for i in "${!MIRRORS[@]}"; do [ "${MIRRORS[$i]}" = "$name" ] && unset 'MIRRORS[i]'; done
    return "$rc"
}

# odirect_write NAME OFFSET_KIB SIZE_KIB: write random data through the mirror with O_DIRECT and check
# that it landed on every leg; records write_on_all_legs.
odirect_write() {
    local name=$1 off=$2 kib=$3 src=$WORK/$SCEN-write.bin ok=yes dev
    dd if=/dev/urandom of="$src" bs=1K count="$kib" status=none
    dd if="$src" of="/dev/mapper/$name" bs=64K seek="$((off * 1024))" oflag=direct,seek_bytes conv=notrunc \
        status=none \
        || fail "O_DIRECT write to $name failed"
    sync
    for dev in "${LEGS[@]}"; do
        cmp -s -n "$((kib * 1024))" "$src" <(dd if="$dev" bs=64K skip="$((off * 1024))" iflag=direct,skip_bytes status=none) \
            || ok=no
    done
    check "write_on_all_legs" "$ok" yes
}

# background_writer NAME SECONDS: O_DIRECT writes for at most SECONDS (finish_writer ends them sooner),
# 1 MiB (16 × 64 KiB, sequential) at a random 64 KiB-aligned place per round (one dd per round:
# process starts are slow under emulation); sets WRITER_PID. The rounds done so far are counted in a
# file (writer_rounds), so that a scenario waits for writes, not for a time.
background_writer() {
    local name=$1 secs=$2
    WRITER_ROUNDS_FILE=$WORK/$SCEN-writer.rounds
    WRITER_STOP_FILE=$WORK/$SCEN-writer.stop
    rm -f "$WRITER_ROUNDS_FILE" "$WRITER_STOP_FILE"
    (
        end=$(($(date +%s) + secs))
        blocks=$(($(blockdev --getsz "/dev/mapper/$name") / 128))
        n=0
        while [ "$(date +%s)" -lt "$end" ] && [ ! -e "$WRITER_STOP_FILE" ]; do
            blk=$(((RANDOM * 32768 + RANDOM) % (blocks - 15)))
            dd if=/dev/urandom of="/dev/mapper/$name" bs=64K seek="$blk" count=16 oflag=direct \
                conv=notrunc status=none || echo "writer: write failed at block $blk"
            n=$((n + 16))
            echo "$((n / 16))" >"$WRITER_ROUNDS_FILE"
        done
        echo "writer: $n writes of 64 KiB"
    ) >"$SOUT/writer.log" 2>&1 &
    WRITER_PID=$!
}

# writer_rounds: sets WRITER_ROUNDS to the rounds the background writer has finished (no process
# start: this runs ten times a second while a scenario waits).
WRITER_ROUNDS=0
writer_rounds() {
    local n=
    read -r n 2>/dev/null <"$WRITER_ROUNDS_FILE"
    # The file is rewritten each round: an empty read is a round being written, not a restart.
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -gt "$WRITER_ROUNDS" ] && WRITER_ROUNDS=$n
    return 0
}

# wait_writes ROUNDS [LIMIT] [or-end]: wait until the background writer has finished ROUNDS more
# rounds than when called, i.e. writes went through the mirror; a line every PROGRESS_EVERY s, a
# failed check (status 1) after LIMIT s (default 120) or if the writer ends first (with `or-end`,
# its end also ends the wait, status 0: a time-boxed run like the soak's).
wait_writes() {
    local want limit=${2:-120} or_end=${3:-} t0=$SECONDS next=$((SECONDS + PROGRESS_EVERY))
    WRITER_ROUNDS=0
    writer_rounds
    want=$((WRITER_ROUNDS + $1))
    while [ "$WRITER_ROUNDS" -lt "$want" ]; do
        if ! kill -0 "$WRITER_PID" 2>/dev/null; then
            writer_rounds
            [ "$WRITER_ROUNDS" -ge "$want" ] || [ -n "$or_end" ] && break
            fail "the writer ended after $WRITER_ROUNDS rounds, before round $want"
            return 1
        fi
        if ((SECONDS - t0 > limit)); then
            fail "the writer did $WRITER_ROUNDS rounds, not $want, in ${limit}s"
            return 1
        fi
        if ((SECONDS >= next)); then
            log "waiting for the writer: $WRITER_ROUNDS rounds of $want done"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.1
        writer_rounds
    done
}

# finish_writer ROUNDS: let the background writer finish ROUNDS more rounds, then stop it after its
# current one and wait_writer.
finish_writer() {
    wait_writes "$1"
    : >"$WRITER_STOP_FILE"
    wait_writer
}

# ---------------------------------------------------------------------------------------------
# The standard mirror of the daemon scenarios: 2 legs of 16 MiB, region size 1024 sectors = 32 regions.

MIRROR_SECTORS=32768
MIRROR_REGION=1024
MIRROR_REGIONS=32
MIRROR_TABLE=

# setup_mirror NAME UUID TYPE [integrated_flush]: legs (+ log device for clustered-disk), daemon,
# mirror, full resync; checks the sync count, identical legs and the resync count.
setup_mirror() {
    local name=$1 uuid=$2 type=$3 flags=${4:-} logarg=
    make_legs 2 16
    if [ "$type" = clustered-disk ]; then
        make_logdev 4
        logarg=$(devno "$LOGDEV")
    fi
    start_daemon
    MIRROR_TABLE=$(LOGDEV=$logarg mirror_table "$MIRROR_SECTORS" "$uuid" "$type" "$MIRROR_REGION" "$flags")
    create_mirror "$name" "$MIRROR_TABLE"
    wait_sync "$name" 120
    check "sync_initial" "$(sync_field "$name")" "$MIRROR_REGIONS/$MIRROR_REGIONS"
    check "legs_after_resync" "$(cmp_legs)" equal
    check "resync_initial" "$(resync_count)" "$MIRROR_REGIONS"
}

# expected_status TYPE: the `dmsetup status` line of the standard mirror when in sync.
expected_status() {
    local t1 t2 info
    t1=$(devno "${LEGS[0]}") t2=$(devno "${LEGS[1]}")
    case $1 in
        clustered-core) info="1 clustered-core" ;;
        clustered-disk) info="3 clustered-disk $(devno "$LOGDEV") A" ;;
    esac
    echo "0 $MIRROR_SECTORS mirror 2 $t1 $t2 $MIRROR_REGIONS/$MIRROR_REGIONS 1 AA $info"
}

# expected_table UUID TYPE [integrated_flush]: the `dmsetup table` line of the standard mirror.
expected_table() {
    local uuid=$1 type=$2 flags=${3:-} args n t1 t2
    t1=$(devno "${LEGS[0]}") t2=$(devno "${LEGS[1]}")
    args="$uuid${flags:+ $flags} $type"
    [ "$type" = clustered-disk ] && args="$args $(devno "$LOGDEV")"
    args="$args $MIRROR_REGION"
    # shellcheck disable=SC2086
    n=$(set -- $args; echo $#)
    echo "0 $MIRROR_SECTORS mirror userspace $n $args 2 $t1 0 $t2 0"
}

# check_status_table NAME UUID TYPE [integrated_flush]
check_status_table() {
    check "status" "$(dm_status "$1")" "$(expected_status "$3")"
    check "table" "$(dm_table "$1")" "$(expected_table "$2" "$3" "${4:-}")"
}

# capture_luids UUID: distinct luids seen with UUID in this scenario's capture files (any framing).
capture_luids() {
    "$PY" "$ULOG_CHECKOUT/tools/vm/capture_scan.py" luids "$1" "$SOUT"/capture*.bin 2>/dev/null | wc -l
}

# wait_writer: wait for WRITER_PID; records writer_rc and the writer's summary line.
wait_writer() {
    local t0 next=$((SECONDS + PROGRESS_EVERY))
    t0=$(now)
    while kill -0 "$WRITER_PID" 2>/dev/null; do
        if ((SECONDS >= next)); then
            log "waiting for the writer to finish ($(elapsed "$t0") s)"
            next=$((SECONDS + PROGRESS_EVERY))
        fi
        sleep 0.5
    done
    wait "$WRITER_PID"  # bash keeps an exited child's status until it is waited for
    record "writer_rc" "$?"
    record "writer" "$(tail -1 "$SOUT/writer.log")"
}

# scen_dmesg: kernel messages since this scenario started.
scen_dmesg() { dmesg | sed -n "/ulogvm: scenario $SCEN start/,\$p"; }

# restart_scenario kill9|sigterm: the daemon goes away while a writer runs and comes back after a few
# seconds; the writer must finish and the legs must be identical.
restart_scenario() {
    local mode=$1 name=ulog-restart-$1 uuid=ulogvm-restart-$1 before after down=${DOWN_SECONDS:-5}
    setup_mirror "$name" "$uuid" clustered-core
    before=$(resync_count)
    background_writer "$name" 180
    wait_writes 2
    case $mode in
        kill9) kill9_daemon ;;
        sigterm) stop_daemon ;;
    esac
    log "daemon down for ${down}s while the writer runs"
    sleep "$down"  # the outage itself, not a wait for something
    start_daemon
    # Writes through the restarted daemon: the kernel reconnected and every write waiting since the
    # stop went on (a request sent to the killed daemon first times out: 15 s).
    finish_writer 4
    check "writer_ok" "$(grep -c 'write failed' "$SOUT/writer.log")" 0
    sync
    after=$(resync_count)
    record "resync_after_restart" "$((after - before))"
    record "sync_after_writer" "$(sync_field "$name")"
    check "legs_after_writer" "$(cmp_legs)" equal
    record "diff_regions_after_writer" "$(count_diff_regions "$MIRROR_REGION")"
    # A real resume resets the kernel's in-sync hint, so recovery of anything the log holds out of
    # sync happens now.
    timeout 60 dmsetup suspend "$name"; check "suspend_rc" "$?" 0
    timeout 60 dmsetup resume "$name"; check "resume_rc" "$?" 0
    wait_sync "$name" 60
    record "resync_after_resume" "$(($(resync_count) - after))"
    check "legs_final" "$(cmp_legs)" equal
    record "dmesg_server_not_found" "$(scen_dmesg | grep -c 'Userspace log server not found')"
    record "dmesg_reconnected" "$(scen_dmesg | grep -c 'Reconnected to userspace log server')"
    record "dmesg_timed_out" "$(scen_dmesg | grep -c 'timed out')"
    check_status_table "$name" "$uuid" clustered-core
    remove_mirror "$name"
    stop_daemon
}

# resume_and_resync NAME SINCE KEY EXPECTED [SUFFIX]: suspend + resume NAME (a real resume resets
# the kernel's in-sync hint, so whatever the log holds out of sync is recovered now), wait until it
# is in sync, and check KEY: the regions resynced since SINCE (a resync_count) must be EXPECTED.
# SUFFIX tells the suspend_rc/resume_rc keys of a second round apart.
resume_and_resync() {
    local name=$1 since=$2 key=$3 want=$4 sfx=${5:-}
    timeout 60 dmsetup suspend "$name"; check "suspend_rc$sfx" "$?" 0
    timeout 60 dmsetup resume "$name"; check "resume_rc$sfx" "$?" 0
    wait_sync "$name" 120
    check "$key" "$(($(resync_count) - since))" "$want"
}

# ---------------------------------------------------------------------------------------------
# Clean-up (runs at the end of every scenario subshell)

cleanup() {
    local name i
    [ -n "${WRITER_STOP_FILE:-}" ] && : >"$WRITER_STOP_FILE"  # a writer left running ends its round
    for name in "${MIRRORS[@]}"; do
        timeout 30 dmsetup --noudevsync remove --force "$name" >/dev/null 2>&1 \
            || log "cleanup: cannot remove $name"
    done
    if [ -n "$DAEMON_PID" ]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        for ((i = 0; i < 10; i++)); do kill -0 "$DAEMON_PID" 2>/dev/null && sleep 0.1; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    for name in "${LEGS[@]}" ${LOGDEV:+"$LOGDEV"}; do losetup -d "$name" 2>/dev/null; done
    rm -f "$WORK"/legs/"$SCEN"-*.img
    dmesg >"$SOUT/dmesg.txt" 2>/dev/null
    log "cleanup done"
}
