#!/usr/bin/env bash
# One entry point that sets up a fresh machine and runs a job.
#   bash tools/run.sh demo   - boot a real kernel under qemu, serve a mirror with dm-ulogd + LMDB,
#                              kill -9 the daemon mid-write, restart it, show what survived
#   bash tools/run.sh test   - the whole test suite, real-kernel scenarios included
#   bash tools/run.sh setup  - only the set-up (Debian packages, virtualenv, kernel image)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
venv="$here/.venv"

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_apt+=(busybox-static)
command -v dmsetup >/dev/null || need_apt+=(dmsetup)
command -v losetup >/dev/null || need_apt+=(util-linux)
command -v man >/dev/null || need_apt+=(man-db)
# corosync brings libcpg4 and libquorum5, which cluster mode and its rig tests load
command -v corosync >/dev/null || need_apt+=(corosync)

# ticker WHAT: say every 5 s that WHAT still runs, until killed (or this script ends): pip -q and
# apt-get -qq are silent for a minute on a fresh machine, which looks like a hang.
ticker() {
    local t0=$SECONDS
    while sleep 5 && kill -0 $$ 2>/dev/null; do echo "   ... $1 ($((SECONDS - t0)) s)"; done
}

setup() {
    if [ ${#need_apt[@]} -gt 0 ]; then
        echo "== installing Debian packages: ${need_apt[*]}"
        export DEBIAN_FRONTEND=noninteractive
        ticker "installing Debian packages" & tick=$!
        apt-get update -qq
        # Debian starts and enables corosync.service as a one-node cluster on installation: on a
        # machine that had no corosync, that is a service nobody asked for (the tests run their own
        # in network namespaces), so it is neither started nor enabled. A corosync that was already
        # installed is left exactly as it was.
        policy=""
        if [[ " ${need_apt[*]} " == *" corosync "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
            policy=/usr/sbin/policy-rc.d
            printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
        fi
        if ! apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null; then
            [ -z "$policy" ] || rm -f "$policy"
            echo "tools/run.sh: installing ${need_apt[*]} failed" >&2
            exit 1
        fi
        if [ -n "$policy" ]; then
            rm -f "$policy"
            if command -v systemctl >/dev/null; then systemctl disable corosync >/dev/null 2>&1 || true; fi
        fi
        kill "$tick"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "== creating $venv"
        python3 -m venv "$venv"
    fi
    echo "== installing ulog-disk and its test and benchmark dependencies into $venv"
    ticker "pip install" & tick=$!
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test,bench]" 2>&1 | grep -v "^WARNING: Location" || true
    kill "$tick"
    "$venv/bin/python" -c "import ulog_disk, lmdb, construct, bitarray, pyroute2, matplotlib"
    echo "== building the manual pages into build/man (dm-ulogd.8, ulog-recover.8, ulog-dump.8)"
    "$venv/bin/python" tools/make_man.py --out "$here/build/man" >/dev/null
    if [ -f tools/vm/ulogvm.py ]; then
        echo "== preparing the qemu guest (Debian kernel image, initramfs)"
        "$venv/bin/python" tools/vm/ulogvm.py setup
    fi
}

case "${1:-}" in
    setup) setup ;;
    test)
        setup
        shift
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    demo)
        setup
        exec "$venv/bin/python" tools/vm/ulogvm.py demo
        ;;
    demo-cluster)
        # Two real kernels sharing the legs of one mirror; one dies (tools/vm/cluster/README.md).
        setup
        exec "$venv/bin/python" tools/vm/cluster2.py run node-dies
        ;;
    *)
        echo "usage: bash tools/run.sh setup|test|demo|demo-cluster" >&2
        exit 2
        ;;
esac
