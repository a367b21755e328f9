"""A platform served from a background thread with its own event loop (tests, the demo)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from medbridge.config import Home
from medbridge.platform.keys import fingerprint
from medbridge.platform.server import Platform


class BackgroundPlatform:
    """Serve ``home`` on ``host`` (port 0: any free one) until :meth:`stop`."""

    def __init__(self, home: Home, host: str = "127.0.0.1"):
        self.home = home
        self.host = host
        self.port = 0
        self.platform: Platform | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def fingerprint(self) -> str:
        assert self.platform is not None
        return fingerprint(self.platform.host_key)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> BackgroundPlatform:
        ready: Future[tuple[str, int]] = Future()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.platform = Platform(self.home)

        async def begin() -> None:
            assert self.platform is not None
            try:
                ready.set_result(await self.platform.start(self.host, 0))
            except BaseException as exc:  # handed to the starting thread, which re-raises it
                ready.set_exception(exc)

        def main() -> None:
            asyncio.set_event_loop(loop)
            starting = loop.create_task(begin())
            loop.run_forever()
            starting.cancel()
            loop.close()

        self._thread = threading.Thread(target=main, name="medbridge-platform", daemon=True)
        self._thread.start()
        try:
            self.host, self.port = ready.result(timeout=30)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the platform's loop and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def stop(self) -> None:
        if self._loop is None or self.platform is None:
            return
        self.call(self.platform.stop())
        self._shutdown_loop()
        self.platform.store.close()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._loop = None

    def __enter__(self) -> BackgroundPlatform:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
