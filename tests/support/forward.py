"""A TCP forwarder to a server on a fixed port, to take the server away and bring it back
(Redis, in the tests of the result store and of shared limits)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Forwarder"]


class Forwarder:
    """Listens on ``port`` and forwards each connection to ``target``; :meth:`stop` closes
    the listener and cuts every connection (mid-call, if one is under way)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self._target = port, target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
