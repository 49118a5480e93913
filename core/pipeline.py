"""Overlapping a stream's stages with threads: `ahead` computes the next items while the caller
works on the current one, `Behind` consumes items while the caller makes the next ones.

A merge reads tensors, merges them and writes them; done one after another, the CPU waits for
the disk and the disk for the CPU. File reads, torch kernels and writes release the GIL, so
one thread per stage overlaps them. Both queues are bounded (`depth` items waiting), which
is what keeps a pipelined merge's memory a stated multiple of one tensor's. Results and order
are those of the plain loop; an exception in a stage is raised in the caller, and a caller
that stops early stops the stage's thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


def ahead(items: Iterable[T], fn: Callable[[T], R], depth: int = 1) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the order of `items`, fn run in a background thread up to `depth`
    items ahead of the caller (depth 0: in the caller's thread, no overlap)."""
    if depth <= 0:
        for item in items:
            yield item, fn(item)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                result = fn(item)
                while not stop.is_set():
                    try:
                        q.put((item, result), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # raised in the caller
            q.put(e)

    thread = threading.Thread(target=produce, name="pipeline-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class Behind(Generic[T]):
    """`put(item)` hands items to `consume` in a background thread, at most `depth` waiting
    (depth 0: consumed in the caller's thread). `close()` waits until all are consumed; an
    exception in `consume` is raised by the next `put` or by `close`. As a context manager,
    leaving on an exception abandons the items still waiting."""

    def __init__(self, consume: Callable[[T], None], depth: int = 1):
        self.consume, self.depth = consume, depth
        self._error: BaseException | None = None
        if depth > 0:
            self._q: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="pipeline-behind", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if self._error is None:
                try:
                    self.consume(item)
                except BaseException as e:
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: T) -> None:
        if self.depth <= 0:
            self.consume(item)
            return
        self._raise()
        self._q.put(item)

    def close(self) -> None:
        if self.depth > 0:
            self._q.put(_END)
            self._thread.join()
            self._raise()

    def __enter__(self) -> "Behind[T]":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        elif self.depth > 0:
            self._error = self._error or value  # the consumer skips what is left
            self._q.put(_END)
            self._thread.join()
