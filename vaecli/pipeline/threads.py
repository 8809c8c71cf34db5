"""Threads that overlap reading, computing and writing: a producer ahead of its consumer, a writer behind it.

Stages talk through bounded queues, so a long job is bounded by its slowest stage and memory does not grow with
the video's length.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import numpy as np

from vaecli.errors import InputError
from vaecli.ops.files import write_error

_DONE = object()


def background(items: Iterable, depth: int = 8) -> Iterator:
    """Iterate `items` in a producer thread, `depth` items ahead; its exceptions re-raise here.

    When the consumer stops early (an error, Ctrl-C, or closing this generator), the producer stops too and
    closes its iterator in its own thread (which releases, e.g., an open video container).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(("error", e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, daemon=True, name="vaecli-reader")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


class BackgroundWriter:
    """Feed frames to a writer (`write`, `close`) in a thread through a bounded queue."""

    def __init__(self, writer, depth: int = 16):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="vaecli-writer")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if self.error is None:
                try:
                    self.writer.write(item)
                except OSError as e:  # a writer that let one through (Pillow, PyAV): the one message
                    self.error = write_error(getattr(self.writer, "path", "output"), e)
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    self.error = e

    def put(self, frame: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(frame)

    def close(self) -> None:
        self.queue.put(_DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error
        try:
            self.writer.close()
        except OSError as e:
            raise write_error(getattr(self.writer, "path", "output"), e) from None

    def abort(self) -> None:
        self.error = self.error or InputError("aborted")
        self.queue.put(_DONE)
        self.thread.join(timeout=10)
        self.writer.abort()
