"""LAION embedding parts from a URL (issue 19, point 4): a part's files are fetched by the task
that reads it, together, and each request is retried; nothing is fetched while listing parts.
Served from 127.0.0.1 by the test."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.pipeline import laion
from xm.pipeline.sources.laion400m_embeddings import LaionEmbeddings


def _files(n: int = 4) -> dict[str, bytes]:
    import io

    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float16)
    out = {}
    for rel in ("images/img_emb_3.npy", "texts/text_emb_3.npy"):
        buf = io.BytesIO()
        np.save(buf, x)
        out["/" + rel] = buf.getvalue()
    buf = io.BytesIO()
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(n)], "url": [f"u{i}" for i in range(n)]}), buf)
    out["/metadata/metadata_3.parquet"] = buf.getvalue()
    return out


@pytest.fixture()
def flaky_server():
    """Answers each path 503 the first time, then the file; counts requests by path."""
    files, seen = _files(), Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            with lock:
                seen[self.path] += 1
                first = seen[self.path] == 1
            body = files.get(self.path)
            if body is None or first:
                self.send_response(404 if body is None else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen, files
    server.shutdown()


class _Options:
    source = "laion400m-embeddings"
    coarse = "ViT-B-32:openai"
    limit = None
    parts: list[int] | None = [3]
    url_col, caption_col = "url", "caption"
    metadata_root = None
    embeddings_root: str | None = None
    nsfw_filter, allow_file_urls = True, False
    shard_size = 10_000


def test_a_part_is_fetched_by_its_reader_with_retries(flaky_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(laion, "_SESSIONS", {})
    url, seen, files = flaky_server
    opts = _Options()
    opts.embeddings_root = url
    layout = Layout(tmp_path / "out")
    source = LaionEmbeddings()
    parts = source.parts(opts, layout)  # the driver lists parts ...
    assert [p.name for p in parts] == ["00003"] and not seen  # ... and fetches nothing
    part = source.part_named(opts, layout, "00003")  # a task finds its part by name
    assert part is not None
    samples = list(part.samples())  # and reading it fetches its three files
    assert [s.caption for s in samples] == ["c0", "c1", "c2", "c3"]
    assert seen == Counter({p: 2 for p in files})  # each answered 503 once, then retried
    for ref in part.precomputed.values():  # type: ignore[union-attr]
        assert Path(ref.path).read_bytes() == files["/" + ("images/img_emb_3.npy" if "img" in ref.label else "texts/text_emb_3.npy")]
    assert source.part_named(opts, layout, "00004") is None  # not in --parts


def test_a_missing_file_fails_in_one_line_naming_it(flaky_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(laion, "_SESSIONS", {})
    monkeypatch.setattr(laion, "FETCH_RETRIES", 1)
    url, _, _ = flaky_server
    with pytest.raises(XMError, match=r"/images/img_emb_9.npy: cannot download part 9"):
        laion.fetch(url, "images/img_emb_9.npy", tmp_path / "x.npy", "part 9", "--embeddings-root")
    assert not (tmp_path / "x.npy").exists()
