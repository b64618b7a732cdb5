#!/bin/bash
# One boot, the daemon restart scenarios.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
SCEN=suite-restart
run_suite kill9-restart sigterm-restart kill9-memory
