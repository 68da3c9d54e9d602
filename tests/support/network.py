"""Local ports and a real network outage for the tests. `free_port` hands out a port that nothing
listens on (for a server the test starts later, or for the "connection refused" fault), and
`TcpRelay` sits between a client and a broker so a test can cut every connection and restore
them while the broker keeps running with its data: the only way to have a network fault that
is not a broker restart on one machine.
"""

from __future__ import annotations

import asyncio
import socket
import threading


def free_port() -> int:
    """A port nothing listens on: bind, read the number, close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpRelay:
    """A TCP relay on its own thread in front of a port: `cut()` drops every connection through
    it and refuses new ones, `restore()` accepts again. With a broker that advertises the relay's
    port, that is a network outage after which the broker still has all its data."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.loop = asyncio.new_event_loop()
        self._server = None
        self._pipes: set = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> TcpRelay:
        async def listen():
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)
        self._call(listen())
        return self

    def cut(self) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()
            for task in list(self._pipes):
                task.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)
        self._call(close())

    def close(self) -> None:
        if self._server is not None and self._server.is_serving():
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _relay(self, client_r, client_w) -> None:
        task = asyncio.current_task()
        self._pipes.add(task)
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            self._pipes.discard(task)
            return

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            w.close()

        try:
            await asyncio.gather(pump(client_r, broker_w), pump(broker_r, client_w))
        except asyncio.CancelledError:
            pass  # cut
        finally:
            self._pipes.discard(task)
            client_w.close()
            broker_w.close()
