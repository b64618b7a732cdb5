#!/bin/bash
# SIGTERM (clean stop) of the daemon while a writer runs, restart 5 s later: as kill9-restart, and the
# daemon must exit 0.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

scenario_sigterm_restart() { restart_scenario sigterm; }

main_scenario sigterm-restart
