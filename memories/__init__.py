"""Memories: what the methods retrieve from, behind one interface (`base.Memory`).

A local index folder (`local.LocalMemory`) and a clip-retrieval back over HTTP
(`remote.RemoteMemory`) are peers; `open_memory(location)` picks one through a small
registry (`registry.py`) where another kind registers itself."""

from xm.memories.local import MemoryIndex, open_index
from xm.memories.remote import RemoteMemory, is_remote, open_memory

__all__ = ["MemoryIndex", "RemoteMemory", "is_remote", "open_index", "open_memory"]
