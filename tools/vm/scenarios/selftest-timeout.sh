#!/bin/bash
# Harness self-test: a scenario that never ends. `ulogvm.py run selftest-timeout --timeout 40` must
# come back within the limit with exit code 124 and the console log.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_selftest_timeout() {
    record "sleeping" yes
    sleep 3600
}

main_scenario selftest-timeout
