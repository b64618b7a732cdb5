#!/bin/bash
# Harness self-test: boot, see the checkout at its own path (also when it lives under /tmp, which
# is a tmpfs in the guest), run the checkout's python, find the host tools. Measures boot overhead.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_selftest_boot() {
    local py=$PY
    record "kernel" "$(uname -r)"
    record "uptime_at_start" "$(cat "$OUT/scenario-start-uptime" 2>/dev/null || now)"
    record "checkout" "$ULOG_CHECKOUT"
    check "checkout_visible" "$([ -f "$ULOG_CHECKOUT/tools/vm/ulogvm.py" ] && echo yes || echo no)" yes
    check "checkout_mount" "$(awk -v p="$ULOG_CHECKOUT" '$2 == p { print $3 }' /proc/mounts | tail -1)" 9p
    check "tmp_is_tmpfs" "$(awk '$2 == "/tmp" { print $3 }' /proc/mounts | tail -1)" tmpfs
    check "py_exists" "$([ -x "$py" ] && echo yes || echo no)" yes
    [ -x "$py" ] || py=python3
    check "py_runs" "$("$py" -c 'print("ok")')" ok
    record "py_prefix" "$("$py" -c 'import sys; print(sys.prefix)')"
    record "py_ulog_disk" "$("$py" -c 'import ulog_disk, os; print(os.path.dirname(ulog_disk.__file__))' 2>&1 | tail -1)"
    local tool
    for tool in dmsetup losetup cmp blockdev dd awk timeout; do
        check "tool_$tool" "$(command -v "$tool" >/dev/null && echo yes || echo no)" yes
    done
    check "dm_control" "$([ -c /dev/mapper/control ] && echo yes || echo no)" yes
    check "dm_targets_mirror" "$(dmsetup targets | awk '$1 == "mirror" { print "yes" }')" yes
    check "out_writable" "$(touch "$OUT/.w" && echo yes || echo no)" yes
    rm -f "$OUT/.w"
}

main_scenario selftest-boot
