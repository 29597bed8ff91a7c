"""Micro-batching for in-process students: callers on any thread put requests, one daemon thread
serves them in batches.

A batch starts with the first waiting request and takes whatever else arrives within ``max_wait_s``
(at most ``max_batch``), so a lone request waits at most ``max_wait_s`` and concurrent ones share
one forward pass. Each request carries a ``future`` that ``serve`` resolves; on :meth:`close`,
requests still queued get ``closed_error()`` instead of leaving their callers waiting.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["MicroBatcher"]

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, serve: Callable[[list[T]], None], *, max_batch: int, max_wait_s: float, name: str,
                 closed_error: Callable[[], Exception]):
        self.serve = serve
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.closed_error = closed_error
        self.closed = False
        self._queue: queue.Queue[T | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        self._queue.put(item)

    def close(self, timeout: float = 30.0) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self.serve(batch)
            if stop:
                break
        while True:  # fail what is still queued rather than leave callers waiting
            try:
                left: Any = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.future.set_exception(self.closed_error())
