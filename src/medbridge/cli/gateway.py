"""``medbridge gateway serve``."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from medbridge import logs
from medbridge.descriptors import raise_limit
from medbridge.errors import InvalidInput
from medbridge.logs import FORMATS


@click.group()
def gateway() -> None:
    """The gateway at the HPC edge."""


@gateway.command("serve")
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path), help="TOML route table.")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Log lines on stderr as text or JSON objects.")  # fmt: skip
def gateway_serve(config_file: Path, log_format: str) -> None:
    """Relay compute nodes to the platform by port; SIGHUP reloads the routes, SIGTERM stops."""
    from medbridge.gateway.config import GatewayConfig, parse
    from medbridge.gateway.server import Gateway, serve

    def load() -> GatewayConfig:
        try:
            text = config_file.read_text()
        except OSError as exc:
            raise InvalidInput(f"--config {config_file}: {exc.strerror}") from exc
        return parse(text, str(config_file))

    load()
    logs.configure("gateway", log_format)
    raise_limit()  # before any route is bound: the per-source limit is derived from it
    stop, reload = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        (reload if signum == signal.SIGHUP else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def ready(gw: Gateway) -> None:
        for listener in gw.listeners.values():
            r = listener.route
            host, port = listener.sock.getsockname()[:2]
            backends = ", ".join(map(str, r.backends))
            proxy = " (PROXY v2)" if r.proxy_protocol else ""
            click.echo(f"route {r.name} listening on {host}:{port} -> {backends}{proxy}")
        if gw.metrics_address:
            click.echo(f"metrics on http://{gw.metrics_address[0]}:{gw.metrics_address[1]}/metrics")
        sys.stdout.flush()

    serve(load, ready, stop, reload)
