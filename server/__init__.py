"""`xm serve`: a clip-retrieval-compatible kNN service over xm memories, a classify
endpoint and a web page; and `RemoteMemory`, a clip-retrieval back used as a memory."""
