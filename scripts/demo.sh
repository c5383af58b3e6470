#!/usr/bin/env bash
# The demo (under a minute): a trading bot killed with SIGKILL resumes exactly; its damaged state file is
# recovered at the next start; then the operator's view (validate, backups list, a restore with its diff).
source "$(dirname "$0")/_venv.sh"
exec posstate demo "$@"
