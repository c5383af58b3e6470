"""The ``posstate`` command line: the group and its common options (:mod:`posstate.cli.base`,
:mod:`posstate.cli.options`) with every command registered on it.

One module per command or command group, ``posstate/cli/<name>_cmd.py`` (as borg's ``archiver/*_cmd.py``):
importing a module registers its commands on :data:`~posstate.cli.base.cli`. Commands are thin: parse, call
the library, print (:mod:`posstate.cli.render`); errors map to exit codes in :mod:`posstate.cli.base`.
"""

from __future__ import annotations

from posstate.cli import (  # noqa: F401 (commands register on cli)
    backups_cmd,
    demo_cmd,
    doctor_cmd,
    inspect_cmd,
    journal_cmd,
    keys_cmd,
    reconcile_cmd,
    repair_cmd,
    replica_cmd,
    serve_cmd,
    transfer_cmd,
    watch_cmd,
)
from posstate.cli.base import cli, terminate_like_interrupt
from posstate.cli.examples import add_examples

__all__ = ["cli", "main"]

add_examples(cli)


def main() -> None:
    """Console-script entry point (``posstate``, ``python -m posstate``, ``python cli.py``)."""
    terminate_like_interrupt()
    cli(prog_name="posstate")
