#!/bin/bash
# kill -9 the daemon while a writer runs, restart it 5 s later: the kernel reconnects (CTR + RESUME per
# log), the writer finishes, the legs are identical; resync counts are recorded.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_kill9_restart() { restart_scenario kill9; }

main_scenario kill9-restart
