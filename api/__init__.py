"""xm — retrieval-augmented zero-shot CLIP over LAION-style memories.

The small Python API under the CLI, so that a notebook can do what `xm` does::

    import xm
    index = xm.open_index("indexes/mine")
    encoder = xm.load_encoder("RN50:openai")
    hits = index.search_image(encoder_for_coarse.encode_images([img]), k=10)

Submodules are imported lazily: `import xm` stays cheap (no torch) for the CLI.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# albumentations (pulled in by img2dataset) phones home at import; we run offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

_LAZY = {
    "XMError": "xm.errors",
    "EncoderSpec": "xm.encoders",
    "Encoder": "xm.encoders",
    "load_encoder": "xm.encoders",
    "load_image": "xm.encoders",
    "open_index": "xm.memories",
    "open_memory": "xm.memories",
    "Memory": "xm.memories",
    "LocalMemory": "xm.memories",
    "build_index": "xm.pipeline",
    "BuildConfig": "xm.pipeline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY) + ["__version__"]
