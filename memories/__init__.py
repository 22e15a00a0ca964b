"""Memories: what the methods retrieve from, behind one interface (`base.Memory`).

A built index folder (`local.LocalMemory`) and a clip-retrieval back over HTTP
(`remote.RemoteMemory`) are peers; `open_memory(location)` picks one through a small
registry (`registry.py`) where another kind registers itself (`register_memory`)."""

from xm.memories.base import Memory
from xm.memories.local import LocalMemory, open_index
from xm.memories.registry import open_memory, register_memory
from xm.memories.remote import RemoteMemory

__all__ = ["LocalMemory", "Memory", "RemoteMemory", "open_index", "open_memory", "register_memory"]
