"""`--source laion400m-embeddings`: LAION's precomputed ViT-B/32 embedding parts (images/,
texts/, metadata/; `--parts`, taken whole), no images. Where they live: `pipeline/laion.py`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from xm.errors import XMError
from xm.indexes.layout import Layout, part_name
from xm.pipeline import laion
from xm.pipeline.sources.base import ArrayRef, Part, Plan, Sample, Source, SourceOptions

# (modality, the part's file holding it); the arrays are attributed to the coarse encoder, as the user names it
_ARRAYS = (("image", "img_emb"), ("text", "text_emb"))


class LaionEmbeddings(Source):
    name = "laion400m-embeddings"
    has_images = False

    def provided(self, cfg: SourceOptions) -> dict[tuple[str, str], str]:
        return {(cfg.coarse, modality): f"{self.name}:{name}" for modality, name in _ARRAYS}

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        if cfg.limit is not None:
            raise XMError("--limit: LAION's precomputed embedding parts are taken whole; choose how many with --parts")
        root = cfg.embeddings_root or laion.EMBEDDINGS_ROOT
        parts = cfg.parts if cfg.parts is not None else list(range(laion.EMBEDDING_PARTS))
        return [self._part(root, layout, i, cfg.coarse) for i in parts]

    def part_named(self, cfg: SourceOptions, layout: Layout, name: str) -> Part | None:
        """Part `name` directly (no other part is looked at, nor fetched)."""
        if cfg.limit is not None or not name.isdigit():
            return super().part_named(cfg, layout, name)
        i = int(name)
        if cfg.parts is not None and i not in cfg.parts:
            return None
        return self._part(cfg.embeddings_root or laion.EMBEDDINGS_ROOT, layout, i, cfg.coarse)

    def task_inputs(self, cfg: SourceOptions, layout: Layout, name: str) -> list[str] | None:
        return []  # its task fetches the part's three files from --embeddings-root itself

    def _part(self, root: str, layout: Layout, i: int, coarse: str) -> Part:
        """Part i. From a URL root its three files are fetched by whoever reads the part (the
        task that embeds it, on an executor), together and with retries (`laion.fetch_many`),
        not one after another on the driver while it lists the parts."""
        jobs = [(root, rel, layout.work / "laion" / Path(rel).name, f"LAION-400M embedding part {i} ({kind})", "--embeddings-root")
                for kind, rel in laion.embedding_part_names(i).items()]
        if "://" in root:
            files = {kind: dest for kind, (_, _, dest, _, _) in zip(laion.embedding_part_names(i), jobs)}
        else:  # a folder: the files are read where they are (found, not copied)
            files = dict(zip(laion.embedding_part_names(i), laion.fetch_many(jobs, threads=1)))
        refs = {(coarse, modality): ArrayRef(files[name], None, f"{self.name}:{name}", meta=files["metadata"])
                for modality, name in _ARRAYS}
        return Part(name=part_name(i), samples=functools.partial(_samples, files["metadata"], jobs), precomputed=refs)

    def problems(self, cfg: SourceOptions, plan: Plan) -> list[str]:
        offline = laion.offline() and not laion.usable_offline(cfg.embeddings_root)
        return (["LAION-400M embeddings: XM_OFFLINE is set and no --embeddings-root; download the images/ texts/ "
                 "metadata/ parts on a connected machine and pass --embeddings-root FOLDER"] if offline else []) \
            + super().problems(cfg, plan)


def _samples(meta: Path, jobs: list[tuple[str, str, Path, str, str]]) -> Iterator[Sample]:
    # a part's samples are read before its arrays (embed_part): fetch all three files first
    laion.fetch_many(jobs)
    table = pq.read_table(meta)
    cols = table.column_names
    cap = "caption" if "caption" in cols else "TEXT"
    url = "url" if "url" in cols else "URL"
    extra_cols = [c for c in cols if c not in (cap, url)]
    for j, row in enumerate(table.to_pylist()):
        yield Sample(
            key=str(row.get("key") or row.get("SAMPLE_ID") or j),
            caption=row.get(cap) or "",
            url=row.get(url),
            extra={c: row[c] for c in extra_cols if isinstance(row[c], (str, int, float, bool))},
        )
