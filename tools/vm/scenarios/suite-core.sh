#!/bin/bash
# One boot, the scenarios that need no daemon restart: the harness's own listener first (the kernel,
# the connector and dmsetup work, whatever state the package is in), then dm-ulogd's.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
SCEN=suite-core
run_suite smoke-listener basic-core basic-disk integrated-flush suspend-resume reload-same-uuid clear-inactive
