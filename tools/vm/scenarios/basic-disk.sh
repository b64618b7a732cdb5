#!/bin/bash
# clustered-disk mirror: like basic-core, with a third loop device named as the log device.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_basic_disk() {
    local name=ulog-disk uuid=ulogvm-basic-disk
    setup_mirror "$name" "$uuid" clustered-disk
    odirect_write "$name" 4096 512
    check "legs_after_write" "$(cmp_legs)" equal
    check_status_table "$name" "$uuid" clustered-disk
    remove_mirror "$name"
    stop_daemon
}

main_scenario basic-disk
