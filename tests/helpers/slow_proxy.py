"""SlowProxy: a TCP proxy that delays every chunk by a fixed latency in each direction (a delay line:
bytes keep their order and many can be in flight), for testing a worker against a slow Redis."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from types import TracebackType


class SlowProxy:
    """Listens on 127.0.0.1:<port> and forwards to target_host:target_port, adding `latency_s` to
    each hop (so a request-reply round trip costs 2 x latency_s)."""

    def __init__(self, target_port: int, latency_s: float = 0.05, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.latency_s = latency_s
        self.port = 0
        self.num_chunks = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, family=socket.AF_INET))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, upstream_writer),
                             self._pipe(upstream_reader, client_writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await line.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                self.num_chunks += 1
                line.put_nowait((time.monotonic() + self.latency_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            line.put_nowait((0.0, b""))
            with contextlib.suppress(ConnectionError, OSError):
                await sender

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> SlowProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
