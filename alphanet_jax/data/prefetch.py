"""Background prefetch: any iterator run in a thread, a few items ahead (no jax).

The wrapper keeps ``get_state()`` exact: it returns the wrapped iterator's state after the last item
handed out, not after the read-ahead.
"""
from __future__ import annotations

import queue
import threading

from alphanet_jax.errors import ConfigError

__all__ = ["prefetch"]


class _Prefetcher:
    _END = object()

    def __init__(self, iterator, size: int):
        if size < 1:
            raise ConfigError(f"prefetch size must be >= 1, got {size}")
        self._src = iterator
        self._has_state = callable(getattr(iterator, "get_state", None))
        self._q: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._state = iterator.get_state() if self._has_state else None
        self._stats = dict(getattr(iterator, "stats", {}) or {})
        self._done = False
        self._thread = threading.Thread(target=self._run, name="alphanet-data-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for item in self._src:
                state = self._src.get_state() if self._has_state else None
                stats = dict(getattr(self._src, "stats", {}) or {})
                if not self._put(("item", item, state, stats)):
                    return
            self._put(("end", None, None, None))
        except BaseException as e:  # forwarded to the consumer
            self._put(("error", e, None, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value, state, stats = self._q.get()
        if kind == "item":
            self._state, self._stats = state, stats
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def get_state(self):
        """State of the wrapped iterator after the last batch *returned by this wrapper*."""
        if not self._has_state:
            raise AttributeError("the wrapped iterator has no get_state()")
        return self._state

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def epoch(self):
        if self._state is not None and "epoch" in self._state:
            return self._state["epoch"]
        return getattr(self._src, "epoch", None)

    def close(self):
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


def prefetch(iterator, size: int = 2) -> _Prefetcher:
    """Run ``iterator`` in a background thread, keeping up to ``size`` items ready.

    Exceptions are re-raised in the consumer.  If the iterator has ``get_state()``, the wrapper's
    ``get_state()`` returns the state matching the last item it handed out (not the read-ahead).
    Does not import jax; device placement is left to the caller."""
    return _Prefetcher(iterator, size)
