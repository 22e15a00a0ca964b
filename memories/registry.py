"""Which memory a location opens: a registry of memory kinds.

    from xm.memories.registry import open_memory, register_memory
    memory = open_memory("indexes/mine")                           # LocalMemory
    memory = open_memory("http://host:1234/?indice_name=NAME")     # RemoteMemory
    register_memory("toy", ToyMemory)                              # "toy://..." opens a ToyMemory

A kind is matched by URL scheme (the text before "://") or by a predicate over the location;
kinds registered later are asked first, and a location no kind claims is a local index folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xm.memories.base import Memory
from xm.memories.local import LocalMemory
from xm.memories.mirrored import is_mirrored, open_mirrored
from xm.memories.remote import RemoteMemory

Location = str | Path
Factory = Callable[[Location], Memory]
Matcher = Callable[[Location], bool]


@dataclass(frozen=True)
class MemoryKind:
    matches: Matcher
    factory: Factory
    name: str


def scheme_of(location: Location) -> str | None:
    """The URL scheme of a location ("http" for "http://..."), lower-cased; None for a path."""
    if isinstance(location, str) and "://" in location:
        return location.split("://", 1)[0].lower()
    return None


def _by_scheme(scheme: str) -> Matcher:
    scheme = scheme.lower()
    return lambda location: scheme_of(location) == scheme


def _remote(location: Location) -> Memory:
    return RemoteMemory(str(location))


def _local(location: Location) -> Memory:
    return LocalMemory(location)


# xm's own kinds; a new one is its module and one line here (a local folder is the fallback)
_KINDS: list[MemoryKind] = [
    MemoryKind(_by_scheme("http"), _remote, "http"),
    MemoryKind(_by_scheme("https"), _remote, "https"),
    MemoryKind(is_mirrored, open_mirrored, "object-store"),  # s3://, gs://, hdfs://: a local copy
]


def register_memory(match: str | Matcher, factory: Factory, name: str | None = None) -> None:
    """Open locations matched by `match` (a URL scheme, or a predicate) with `factory`."""
    matcher = _by_scheme(match) if isinstance(match, str) else match
    label = name or (match if isinstance(match, str) else str(getattr(factory, "__name__", "memory")))
    _KINDS.insert(0, MemoryKind(matcher, factory, label))


def unregister_memory(name: str) -> None:
    """Forget a registered kind (a test cleans up after itself)."""
    _KINDS[:] = [k for k in _KINDS if k.name != name]


def open_memory(location: Location) -> Memory:
    """The memory at `location`: the first registered kind that claims it, else a local index folder."""
    for kind in _KINDS:
        if kind.matches(location):
            return kind.factory(location)
    return _local(location)
