"""`--source TABLE`: a parquet/csv/tsv/jsonl file of URLs and captions (or a .txt of URLs),
downloaded by img2dataset."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from xm.errors import XMError, quoted
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

    def screen(self, cfg: SourceOptions, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
        return screen_schemes(Path(cfg.source), table, cfg.allow_file_urls)


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
        raise XMError(f"{path}: no column {url_col!r} (columns: {quoted(', '.join(map(str, df.columns)))}); use --url-col")
    if caption_col not in df.columns:
        if suffix != ".txt":
            raise XMError(f"{path}: no column {caption_col!r} (columns: {quoted(', '.join(map(str, df.columns)))}); use --caption-col")
        df[caption_col] = ""
    df = df.rename(columns={url_col: "url", caption_col: "caption"})
    df["caption"] = df["caption"].fillna("").astype(str)
    df = df[df["url"].notna()]
    return pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)


# the reasons the build's failures table shows for the rows the select stage keeps from img2dataset
FILE_URL = "file:// URL not fetched (see --allow-file-urls)"
NOT_HTTP = "not an http(s) URL"


def screen_schemes(path: Path, table: pa.Table, allow_file: bool) -> tuple[pa.Table, dict[str, int]]:
    """An untrusted table must not read the local disk into the memory: only http(s) URLs (and
    file:// with --allow-file-urls) go to img2dataset; the others are counted as failures by
    reason, so a LAION-scale table with a few odd URLs still builds. None fetchable: one line."""
    import pyarrow.compute as pc  # Arrow's compute kernels: loaded only by the sources that filter rows

    urls = pc.fill_null(pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(table["url"], pa.string()))), "")
    http = pc.or_(pc.starts_with(urls, "http://"), pc.starts_with(urls, "https://"))
    file = pc.starts_with(urls, "file://")
    ok = pc.or_(http, file) if allow_file else http
    n_file = 0 if allow_file else int(pc.sum(pc.cast(file, pa.int64())).as_py() or 0)
    n_other = int(pc.sum(pc.cast(pc.invert(pc.or_(http, file)), pa.int64())).as_py() or 0)
    if n_file + n_other == table.num_rows and table.num_rows:
        example = table["url"].filter(pc.invert(ok))[0].as_py()
        raise XMError(f"{path}: none of its {table.num_rows} URL(s) is http(s) (e.g. {quoted(str(example)[:80])!r}); "
                      "only http and https are fetched" + ("" if allow_file else " unless --allow-file-urls"))
    reasons = {reason: n for reason, n in ((FILE_URL, n_file), (NOT_HTTP, n_other)) if n}
    return (table.filter(ok) if reasons else table), reasons
