#!/usr/bin/env bash
# The demo: a bot saving positions is killed with SIGKILL mid-run, restarted, and resumes from its last save.
source "$(dirname "$0")/_venv.sh"
exec posstate demo "$@"
