"""`xm serve`: a clip-retrieval-compatible kNN service over xm memories, a classify
endpoint and a web page. Its client, a clip-retrieval back used as a memory, is
`xm.memories.remote.RemoteMemory`."""
