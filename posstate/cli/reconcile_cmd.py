"""``posstate reconcile --positions exchange.json [--apply]``: the saved positions against the exchange's.

A thin layer over :func:`posstate.reconcile_file` (which opens the state through the manager, so it takes
the writer lock: stop the bot first). Exit 0 when in sync or applied, 1 when differences were found and not
applied.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import click

from posstate.account.reconcile import ReconciliationReport
from posstate.account.reconcile_file import ReconcileFileResult, reconcile_file
from posstate.cli.backups_cmd import require_state_dir
from posstate.cli.base import EXIT_INVALID, EXIT_USAGE, CliError, cli, confirm, json_out
from posstate.cli.options import common_options, env_of
from posstate.cli.output import paint
from posstate.cli.render import applied_lines, reconcile_lines

__all__ = ["reconcile"]


class _NonNegativeDecimal(click.ParamType[Decimal]):
    name = "decimal"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            dec = Decimal(str(value))
        except InvalidOperation:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not dec.is_finite() or dec < 0:
            self.fail(f"{value!r} is not a number >= 0", param, ctx)
        return dec


def _differs(report: ReconciliationReport) -> bool:
    """Anything the report shows that --apply would change."""
    return not report.in_sync or bool(report.size_within_tolerance or report.entry_price_differences)


@cli.command()
@click.option(
    "--positions",
    "positions_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSON file with what ccxt fetch_positions() returned (a list of position dicts).",
)
@click.option(
    "--orders",
    "orders_file",
    type=click.Path(dir_okay=False),
    help="JSON file with what ccxt fetch_open_orders() returned: reconcile the order ledger too.",
)
@click.option(
    "--closed-orders",
    "closed_file",
    type=click.Path(dir_okay=False),
    help="With --orders: the closed orders (ccxt fetch_order by client id of each unknown order, or a "
    "fetch_closed_orders() list that reaches back past them), to resolve orders no longer open. An unknown "
    "order in neither file is taken as never arrived (rejected).",
)
@click.option("--apply", is_flag=True, help="Make the saved positions match the exchange (symbol metadata is kept).")
@click.option(
    "--tolerance", type=_NonNegativeDecimal(), default=Decimal(0), show_default=True, help="Size tolerance, in contracts."
)
@click.option(
    "--price-tolerance",
    type=_NonNegativeDecimal(),
    default=Decimal(0),
    show_default=True,
    help="Entry price tolerance, in quote units.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation before --apply.")
@common_options()
@click.pass_context
def reconcile(
    ctx: click.Context,
    positions_file: str,
    orders_file: str | None,
    closed_file: str | None,
    apply: bool,
    tolerance: Decimal,
    price_tolerance: Decimal,
    yes: bool,
) -> None:
    """Compare the saved positions with the exchange's: missing or stale locally, size and side mismatches.

    Without --apply nothing is written (exit 1 when they differ). With --apply the positions are made to
    match the exchange, keeping symbol metadata, and saved as a new generation (asks first on a
    terminal). Takes the writer lock: refused while a bot runs. With --orders the order ledger is reconciled
    with the exchange's open orders too: adopted, found, not found (rejected) and unresolved (unknown) orders.
    """
    env = env_of(ctx)
    cfg = env.config()
    require_state_dir(cfg)
    kw: dict[str, Any] = {"tolerance": tolerance, "price_tolerance": price_tolerance, **env.manager_kwargs()}
    if closed_file is not None and orders_file is None:
        raise CliError("--closed-orders needs --orders (the exchange's open orders)", code=EXIT_USAGE)
    kw.update(open_orders_path=orders_file, closed_orders_path=closed_file)
    result: ReconcileFileResult = reconcile_file(cfg, positions_file, apply=False, **kw)
    if apply and (_differs(result.report) or _orders_differ(result)):
        if not env.json:
            _show(result.report, cfg.state_path, positions_file)
        confirm(yes=yes, prompt=f"Make the positions in {cfg.state_path} match {positions_file}?", what="reconcile --apply")
        preview = result.report.to_dict()
        result = reconcile_file(cfg, positions_file, apply=True, **kw)
        if env.json:
            json_out(result.to_dict())
            return
        if result.report.to_dict() != preview:
            click.echo("the saved positions changed since the report above; applied this report instead:")
            _show(result.report, cfg.state_path, positions_file)
        assert result.applied is not None
        click.echo("applied:")
        for line in applied_lines(result.applied, result.generation):
            click.echo(paint(line))
        _show_orders(result)
        return
    if env.json:
        json_out(result.to_dict())
    else:
        _show(result.report, cfg.state_path, positions_file)
        _show_orders(result)
        if apply:
            click.echo("nothing to apply")
    if _orders_differ(result) and result.report.in_sync:
        raise CliError(
            f"{cfg.state_path}: the order ledger differs from the exchange's open orders in {orders_file} (see the "
            f"report); apply with `posstate reconcile --positions {positions_file} --orders {orders_file} --apply`",
            code=EXIT_INVALID,
        )
    if not result.report.in_sync:
        raise CliError(
            f"{cfg.state_path}: the saved positions differ from the exchange's in {positions_file} (see the report); "
            f"make them match with `posstate reconcile --positions {positions_file} --apply`",
            code=EXIT_INVALID,
        )


def _orders_differ(result: ReconcileFileResult) -> bool:
    o = result.orders
    return o is not None and bool(o.adopted or o.found or o.not_found or o.unresolved)


def _show_orders(result: ReconcileFileResult) -> None:
    o = result.orders
    if o is None:
        return
    if not _orders_differ(result):
        click.echo("orders: IN SYNC with the exchange's open orders")
        return
    for label, keys in (
        ("adopted (only the exchange had them)", o.adopted),
        ("found on the exchange (unknown -> accepted)", o.found),
        ("not found (unknown -> rejected)", o.not_found),
        ("unresolved (not open on the exchange; unknown until asked)", o.unresolved),
    ):
        if keys:
            click.echo(f"orders {label}: {', '.join(keys)}")


def _show(report: ReconciliationReport, state: object, exchange: str) -> None:
    for line in reconcile_lines(report, state=str(state), exchange=exchange):
        click.echo(paint(line))
