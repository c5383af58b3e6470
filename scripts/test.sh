#!/usr/bin/env bash
# Install everything into .venv (first run only) and run the whole test suite.
source "$(dirname "$0")/_venv.sh"
exec python -m pytest "$@"
