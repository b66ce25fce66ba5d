"""The NATS client's own event loop, on a thread of its own.

nats-py is asyncio. The engine's callers are threads (the sync thread of
group commit) and the server's event loop, which must never wait on a
network round trip inline: each hands a coroutine to this loop and waits
for its result with a timeout (`call`), or awaits it (`run`)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine

STOP_TIMEOUT_S = 5.0


class LoopThread:
    """`LoopThread(name)`: a daemon thread running an asyncio loop until `stop()`."""

    def __init__(self, name: str = "scanpay-nats"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        """Start `coroutine` on the loop; its future (for any thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine, timeout_s: float) -> Any:
        """From another thread: run `coroutine` on the loop and wait for its
        result at most `timeout_s` (then TimeoutError; the coroutine is
        cancelled). Never from the loop's own thread."""
        assert threading.current_thread() is not self.thread, "call() from the NATS loop"
        future = self.submit(coroutine)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.done():               # the coroutine's own timeout
                raise
            future.cancel()
            raise TimeoutError(f"no answer from NATS within {timeout_s:.1f} s") from None

    async def run(self, coroutine: Coroutine) -> Any:
        """From another event loop: await `coroutine` run on this loop."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def stop(self) -> None:
        """Cancel what still runs on the loop (a connection's reader and
        flusher), then stop and close it."""
        if self.loop.is_closed():
            return
        try:
            self.call(_cancel_others(), STOP_TIMEOUT_S)
        except (TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT_S)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_others() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
