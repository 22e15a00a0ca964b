"""`--source laion400m`: LAION-400M's metadata parts (`--parts`, NSFW-filtered) -> select ->
img2dataset download. Where the parts live: `pipeline/laion.py`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from xm.indexes.layout import Layout
from xm.pipeline import laion
from xm.pipeline.sources.base import Plan, SourceOptions
from xm.pipeline.sources.downloaded import DownloadedSource


class Laion400m(DownloadedSource):
    name = "laion400m"

    def url_table(self, cfg: SourceOptions, layout: Layout) -> pa.Table:
        root = cfg.metadata_root or laion.METADATA_ROOT
        parts = cfg.parts or list(range(laion.METADATA_PARTS))
        tables, have = [], 0
        for i in parts:
            name = laion.metadata_part_name(i)
            path = laion.fetch(root, name, layout.work / "select" / name, f"LAION-400M metadata part {i}", "--metadata-root")
            table = pq.read_table(path)
            if cfg.nsfw_filter and "NSFW" in table.column_names:
                import pyarrow.compute as pc  # Arrow's compute kernels: loaded only by the sources that filter rows

                table = table.filter(pc.equal(table["NSFW"], "UNLIKELY"))
            tables.append(table)
            have += table.num_rows
            if cfg.limit and have >= cfg.limit:
                break
        table = pa.concat_tables(tables)
        return table.rename_columns(["url" if c == "URL" else "caption" if c == "TEXT" else c for c in table.column_names])

    def problems(self, cfg: SourceOptions, plan: Plan) -> list[str]:
        why = laion.unreachable(cfg.metadata_root or laion.METADATA_ROOT)
        return ([f"LAION-400M metadata: {why}; pass --metadata-root FOLDER holding its {laion.METADATA_PARTS} "
                 "parquet parts"] if why else []) + super().problems(cfg, plan)
