#!/bin/bash
# clustered-core mirror of 2 legs served by dm-ulogd: full resync, identical legs, an O_DIRECT write
# through the mirror lands on both legs, status/table strings, remove, clean daemon stop.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_basic_core() {
    local name=ulog-core uuid=ulogvm-basic-core
    setup_mirror "$name" "$uuid" clustered-core
    odirect_write "$name" 2048 512
    check "legs_after_write" "$(cmp_legs)" equal
    check_status_table "$name" "$uuid" clustered-core
    remove_mirror "$name"
    stop_daemon
}

main_scenario basic-core
