#!/usr/bin/env bash
# The demo (under a minute): a trading bot killed with SIGKILL resumes exactly; its damaged state file is
# recovered at the next start; then the operator's view (validate, backups list, a restore with its diff).
# The caller's PATH, before _venv.sh puts .venv/bin on it: the demo prints the PATH its explore commands need.
export POSSTATE_DEMO_CALLER_PATH="$PATH"
source "$(dirname "$0")/_venv.sh"
exec posstate demo "$@"
