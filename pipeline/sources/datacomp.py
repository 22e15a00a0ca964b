"""`--source datacomp`: DataComp's metadata parquet + npz pairs under `--metadata-root`, no
images; OpenAI CLIP ViT-B/32 and ViT-L/14 image and caption arrays. What the pool's files
hold: `pipeline/datacomp.py`."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from pathlib import Path

from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.pipeline import datacomp
from xm.pipeline.pins import pin_params
from xm.pipeline.sources.base import ArrayRef, Part, Plan, Sample, Source, SourceOptions


class DataComp(Source):
    name = datacomp.SOURCE
    has_images = False

    def provided(self, cfg: SourceOptions) -> dict[tuple[str, str], str]:
        # the arrays belong to the encoders that produced them, whatever the roles
        return {key: f"{self.name}:{name}" for key, name in datacomp.ARRAYS.items()}

    def parts(self, cfg: SourceOptions, layout: Layout) -> list[Part]:
        """One part per metadata pair, named by its stem; `--limit` cuts the last one (with its arrays)."""
        if cfg.metadata_root is None or "://" in cfg.metadata_root:
            raise XMError(datacomp.problem(cfg.metadata_root) or "--metadata-root: required")
        out, left = [], cfg.limit
        for parquet in datacomp.choose(datacomp.pairs(cfg.metadata_root), cfg.parts):
            if left is not None and left <= 0:
                break
            npz, rows = datacomp.npz_of(parquet), datacomp.num_rows(parquet)
            refs = {key: ArrayRef(npz, name, f"{self.name}:{name}", datacomp.DIMS[key[0]], rows, parquet)
                    for key, name in datacomp.ARRAYS.items()}
            take = rows if left is None else min(rows, left)
            out.append(Part(name=parquet.stem, samples=functools.partial(_samples, parquet, take), precomputed=refs, size=take))
            left = None if left is None else left - take
        # a part once embedded is kept: a later run with another --limit would mix two selections
        # (pinned once the pairs are found usable, so a first run refused here may be retried)
        pin_params(layout.work / "datacomp.json", {"limit": cfg.limit, "parts": cfg.parts}, "--limit/--parts")
        return out

    def part_named(self, cfg: SourceOptions, layout: Layout, name: str) -> Part | None:
        """The pair named `name`, opened directly (a task must not list and read every pair's
        footer to find its own: that is quadratic in parts). Under `--limit` the cut depends on
        the pairs before it, so the parts are derived (the limit bounds how many are read)."""
        if cfg.limit is not None or cfg.metadata_root is None:
            return super().part_named(cfg, layout, name)
        root = Path(cfg.metadata_root)
        parquet = next((c for c in (root / f"{name}.parquet", root / "metadata" / f"{name}.parquet") if c.is_file()), None)
        if parquet is None:
            return None
        rows = datacomp.num_rows(parquet)
        refs = {key: ArrayRef(datacomp.npz_of(parquet), arr, f"{self.name}:{arr}", datacomp.DIMS[key[0]], rows, parquet)
                for key, arr in datacomp.ARRAYS.items()}
        return Part(name=name, samples=functools.partial(_samples, parquet, rows), precomputed=refs, size=rows)

    def problems(self, cfg: SourceOptions, plan: Plan) -> list[str]:
        problem = datacomp.problem(cfg.metadata_root)
        return ([problem] if problem else []) + super().problems(cfg, plan)


def _samples(parquet: Path, take: int) -> Iterator[Sample]:
    for row in itertools.islice(datacomp.read_rows(parquet), take):
        yield Sample(key=str(row["uid"]), caption=row["text"] or "", url=row["url"],
                     extra={c: v for c, v in row.items() if c not in datacomp.REQUIRED_COLUMNS
                            and isinstance(v, (str, int, float, bool))})
