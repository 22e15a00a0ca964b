"""`--source TABLE`: a parquet/csv/tsv/jsonl file of URLs and captions (or a .txt of URLs),
downloaded by img2dataset."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.pipeline.sources.base import SourceOptions
from xm.pipeline.sources.downloaded import DownloadedSource

TABLE_SUFFIXES = {".parquet", ".csv", ".tsv", ".jsonl", ".json", ".txt"}


class UrlTable(DownloadedSource):
    name = "table"
    by_name = False

    def recognises(self, value: str) -> bool:
        path = Path(value)
        if not path.is_file():
            return False
        if path.suffix.lower() in TABLE_SUFFIXES or path.name.endswith((".csv.gz", ".jsonl.gz", ".tsv.gz")):
            return True
        raise XMError(f"{value}: unsupported table type (expected parquet, csv, tsv, jsonl)")

    def url_table(self, cfg: SourceOptions, layout: Layout) -> pa.Table:
        return read_table(Path(cfg.source), cfg.url_col, cfg.caption_col)

    def check_selection(self, cfg: SourceOptions, table: pa.Table) -> None:
        _check_schemes(Path(cfg.source), table, cfg.allow_file_urls)


def read_table(path: Path, url_col: str, caption_col: str) -> pa.Table:
    import pandas as pd  # only a table source reads through pandas (heavy to import)

    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix.startswith(".parquet"):
            df = pd.read_parquet(path)
        elif suffix.startswith(".csv"):
            df = pd.read_csv(path)
        elif suffix.startswith(".tsv"):
            df = pd.read_csv(path, sep="\t")
        elif suffix.startswith((".jsonl", ".json")):
            df = pd.read_json(path, lines=True)
        else:  # .txt: one URL a line, no captions
            df = pd.DataFrame({url_col: path.read_text().split()})
    except Exception as exc:  # pandas raises many types for a bad file
        raise XMError(f"{path}: unreadable table ({str(exc).splitlines()[0][:200]})") from exc
    if url_col not in df.columns:
        raise XMError(f"{path}: no column {url_col!r} (columns: {', '.join(map(str, df.columns))}); use --url-col")
    if caption_col not in df.columns:
        if suffix != ".txt":
            raise XMError(f"{path}: no column {caption_col!r} (columns: {', '.join(map(str, df.columns))}); use --caption-col")
        df[caption_col] = ""
    df = df.rename(columns={url_col: "url", caption_col: "caption"})
    df["caption"] = df["caption"].fillna("").astype(str)
    df = df[df["url"].notna()]
    return pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)


def _check_schemes(path: Path, table: pa.Table, allow_file: bool) -> None:
    """An untrusted table must not read the local disk into the memory: http(s) only."""
    import pyarrow.compute as pc  # Arrow's compute kernels: loaded only by the sources that filter rows

    urls = pc.utf8_lower(pc.cast(table["url"], pa.string()))
    ok = pc.starts_with(urls, "http://")
    for scheme in ["https"] + (["file"] if allow_file else []):
        ok = pc.or_kleene(ok, pc.starts_with(urls, f"{scheme}://"))
    bad = pc.invert(pc.fill_null(ok, False))
    n = pc.sum(bad).as_py() or 0
    if n:
        example = table["url"].filter(bad)[0].as_py()
        raise XMError(f"{path}: {n} URL(s) are not http(s) (e.g. {str(example)[:80]!r}); only http and https are fetched"
                      + ("" if allow_file else " unless --allow-file-urls"))
