#!/bin/bash
# One boot, the daemon scenarios without restarts.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
SCEN=suite-core
run_suite basic-core basic-disk integrated-flush suspend-resume reload-same-uuid clear-inactive
