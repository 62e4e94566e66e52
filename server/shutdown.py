"""Graceful shutdown on SIGTERM and SIGINT.

aiohttp's own signal handling stops listening at once, so a client creating a prediction
during shutdown would see a refused connection. Instead, the first signal drains: the
server keeps listening, answers new creates with 503 and `Retry-After`, gives unfinished
predictions `shutdown_grace` seconds, cancels the rest, and only then lets aiohttp run its
cleanup (stop the runners, flush the outbox, close the database). A second signal exits
at once through the same cleanup.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from server import keys

log = logging.getLogger(__name__)


def _exit() -> None:
    raise web.GracefulExit()


async def drain_on_signals(app: web.Application) -> None:
    """An `on_startup` hook: from now on SIGTERM and SIGINT drain, then exit."""
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[None]] = []

    async def drain() -> None:
        grace = app[keys.CONFIG].shutdown_grace
        try:
            await app[keys.PREDICTIONS].drain(grace)
        finally:
            loop.call_soon(_exit)

    def on_signal(signum: signal.Signals) -> None:
        if draining:
            log.warning("%s again: exiting now", signum.name)
            loop.call_soon(_exit)
            return
        log.info("%s: draining (new predictions get 503)", signum.name)
        draining.append(loop.create_task(drain(), name="drain"))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
