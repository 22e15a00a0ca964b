"""What one `xm build-index` run is asked to do."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xm.errors import XMError
from xm.indexes.layout import write_json

STAGES = ("select", "download", "embed", "index", "store", "manifest")


@dataclass
class BuildConfig:
    source: str
    out: Path
    coarse: str = "ViT-B-32:openai"
    fine: str = "ViT-L-14:openai"
    inference: list[str] = field(default_factory=lambda: ["RN50:openai"])
    # source selection
    limit: int | None = None
    parts: list[int] | None = None
    url_col: str = "url"
    caption_col: str = "caption"
    metadata_root: str | None = None  # LAION metadata parquet folder or base URL
    embeddings_root: str | None = None  # LAION precomputed embeddings folder or base URL
    nsfw_filter: bool = True
    # download (img2dataset)
    image_size: int = 256
    processes: int = 2
    threads: int = 16
    shard_size: int = 10_000
    timeout: int = 10
    distributor: str = "multiprocessing"
    # embed
    batch_size: int = 64
    # index (autofaiss)
    shards: int = 1
    k: int = 128
    max_index_memory: str = "4G"
    current_memory: str = "16G"
    max_query_time_ms: float = 10.0
    index_text: bool = True
    stages: tuple[str, ...] = STAGES
    cache_dir: str | None = None

    def encoder_specs(self) -> list[str]:
        """Every distinct encoder the index needs caption embeddings for, coarse first."""
        seen: list[str] = []
        for spec in [self.coarse, self.fine, *self.inference]:
            if spec not in seen:
                seen.append(spec)
        return seen


def pin_params(path: Path, params: dict[str, Any], what: str) -> None:
    """Record the parameters a build folder was started with; refuse to resume it with others."""
    if path.is_file():
        before = json.loads(path.read_text())
        if before != params:
            raise XMError(f"{path}: this build folder was started with other {what} ({before}); "
                          "use a new --out, or delete the folder to start over")
    else:
        write_json(path, params)
