"""A bounded cache of opened files (memory maps, Parquet readers), shared by one memory's readers.

A memory of 40,000 parts would otherwise hold a memory map and a file descriptor per part per
embedding matrix and per caption-store part: past Linux's 65,530 maps per process, or a
`ulimit -n` of 1,024, opening it fails. Readers open a part when a gather first touches it and
keep at most `capacity` of them, least recently used first out. An evicted value is only
dropped: a thread still reading it holds its own reference, and the map closes when the last
one goes (numpy's memmap and pyarrow's reader close on release).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

# every reader of one memory together; each value holds at most one descriptor and one map.
# A process that has imported faiss and pyarrow already has ~800 maps of its own libraries:
# 128 keeps the total under 1,000 and the descriptors far under `ulimit -n 1024`
DEFAULT_CAPACITY = 128


class OpenFiles:
    """An LRU of opened values by key, thread-safe; `get` opens a missing one with `opener`."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.opened = 0  # how many opens it did (a test, a benchmark)

    def get(self, key: Hashable, opener: Callable[[], T]) -> T:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = opener()  # outside the lock: a slow open does not stall other readers' hits
        with self._lock:
            if key in self._values:  # another thread opened it meanwhile: keep one
                self._values.move_to_end(key)
                return self._values[key]
            self._values[key] = value
            self.opened += 1
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
