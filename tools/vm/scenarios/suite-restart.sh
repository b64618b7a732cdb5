#!/bin/bash
# One boot, the daemon restart scenarios: kill -9, SIGTERM, kill -9 with the memory backend, and the
# state directory lost while the daemon is down.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
SCEN=suite-restart
run_suite kill9-restart sigterm-restart kill9-memory state-lost
