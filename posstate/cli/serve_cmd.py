"""``posstate serve``: the state directory, read-only, over HTTP and WebSocket (posstate/serve/, the ``serve`` extra)."""

from __future__ import annotations

import os

import click

from posstate.cli.base import cli
from posstate.cli.options import common_options, env_of
from posstate.core.errors import ServeError


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback needs --token-file."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8787, show_default=True, help="Port (0: any free port).")
@click.option(
    "--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token every request must carry (chmod 600)."
)
@click.option("--max-save-age", type=click.FloatRange(0), help="Seconds after the last save at which /api/health turns 503.")
@click.option(
    "--max-backup-age", type=click.FloatRange(0), help="Seconds after the newest backup at which /api/health turns 503."
)
@click.option(
    "--poll-interval", type=click.FloatRange(0.01), default=0.25, show_default=True, help="Seconds between looks at the files."
)
@common_options()
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    token_file: str | None,
    max_save_age: float | None,
    max_backup_age: float | None,
    poll_interval: float,
) -> None:
    """Serve the state read-only: JSON API, WebSocket stream, /metrics and a status page at /.

    Reads the state file and its journal as a restarted bot would load them; takes no lock and never writes,
    so it runs beside the bot. Listens on 127.0.0.1 unless --host says otherwise, which needs --token-file.
    See docs/SERVE.md. Ctrl-C stops it.
    """
    try:
        from posstate.serve.health import HealthLimits
        from posstate.serve.server import StateServer, read_token, refuse_the_key_as_token, source_for
    except ImportError as exc:
        raise ServeError(
            f"the serve extra is not installed ({exc.name} is missing)", next_step="pip install 'posstate[serve]'"
        ) from None
    env = env_of(ctx)
    cfg = env.config()
    token = read_token(token_file) if token_file else None
    if token is not None:
        refuse_the_key_as_token(token, env.keyring(), passphrase=os.environ.get("POSSTATE_PASSPHRASE") or None)
    server = StateServer(
        source_for(cfg, read=env.read_options()),
        host=host,
        port=port,
        token=token,
        poll_interval=poll_interval,
        limits=HealthLimits(max_save_age=max_save_age, max_backup_age=max_backup_age),
    )
    auth = "bearer token required" if token else "no token: this machine only"
    click.echo(f"serving {cfg.state_dir} read-only at {server.url} ({auth}; Ctrl-C to stop)", err=True)
    server.serve_forever()
