"""A RewardClient on its own event-loop thread, for trainers that call reward functions from
threads, from their own event loops, or from a fresh `asyncio.run` per batch: every caller
shares one Kafka connection and one reader. Started on first use; closing never raises."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from actprm.client.kafka import RewardClient
from actprm.client.outcome import Outcome

log = logging.getLogger("actprm.client")


class BackgroundRewardClient:
    def __init__(self, settings: Any = None, **client_options: Any):
        self._settings = settings
        self._options = client_options
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.client: RewardClient | None = None

    def _ensure(self) -> tuple[asyncio.AbstractEventLoop, RewardClient]:
        with self._lock:
            if self.client is None:
                settings = self._settings() if callable(self._settings) else self._settings
                client = RewardClient(settings, **self._options)
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="actprm-reward-client", daemon=True)
                thread.start()
                try:
                    asyncio.run_coroutine_threadsafe(client.start(), loop).result(timeout=120)
                except BaseException:
                    loop.call_soon_threadsafe(loop.stop)
                    raise
                self._loop, self._thread, self.client = loop, thread, client
            return self._loop, self.client

    def submit(self, items: Sequence[Mapping[str, Any]], **options: Any) -> concurrent.futures.Future:
        """Outcomes (client.score_each) on the client's loop, as a concurrent future."""
        loop, client = self._ensure()
        return asyncio.run_coroutine_threadsafe(client.score_each(items, **options), loop)

    def score_sync(self, items: Sequence[Mapping[str, Any]], **options: Any) -> list[Outcome]:
        return self.submit(items, **options).result()

    async def score(self, items: Sequence[Mapping[str, Any]], **options: Any) -> list[Outcome]:
        if self.client is None:
            await asyncio.to_thread(self._ensure)  # the first start connects to Kafka: not on the caller's loop
        return await asyncio.wrap_future(self.submit(items, **options))

    def close(self) -> None:
        """Stop the client and its thread. Never raises: a trainer closing down must not die here."""
        with self._lock:
            if self.client is None:
                return
            loop, thread, client = self._loop, self._thread, self.client
            self.client = self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(client.stop(), loop).result(timeout=30)
        except BaseException as err:  # noqa: BLE001  (CancelledError included: closing never raises)
            log.debug("closing the reward client: %s: %s", type(err).__name__, err)
        try:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()
        except BaseException as err:  # noqa: BLE001
            log.debug("stopping the reward client's loop: %s", err)
