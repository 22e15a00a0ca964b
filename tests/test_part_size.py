"""Parts sized for the memory (issue 19, point 2) and found by name (point 4): hundreds of parts
at 400M, one at 1,000; downloaded shards grouped into parts a task finds without listing; an
image folder listed once, one row group a part."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_caption_folder
from xm.errors import XMError
from xm.indexes.layout import Layout
from xm.pipeline import part_size
from xm.pipeline.part_size import auto_part_rows, read_groups
from xm.pipeline.sources.folder import ImageFolder
from xm.pipeline.sources.img2dataset_output import Img2datasetOutput


@pytest.mark.parametrize(("items", "rows", "parts"), [
    (1_000, 10_000, 1), (1_000_000, 10_000, 100), (40_000_000, 80_000, 500),
    (400_000_000, 800_000, 500), (1_000_000_000, 1_000_000, 1_000)])
def test_hundreds_of_parts_at_400m_and_one_at_1000(items, rows, parts) -> None:
    assert auto_part_rows(items) == rows and -(-items // rows) == parts


class _Opts:
    def __init__(self, source: Path, limit: int | None = None, shard_size: int | None = None) -> None:
        self.source, self.limit, self.shard_size = str(source), limit, shard_size
        self.coarse, self.parts, self.metadata_root, self.embeddings_root = "x", None, None, None


def _shards(folder: Path, n: int, per_shard: int = 2) -> Path:
    """An img2dataset webdataset folder: NNNNN.tar with key.txt/.json, and its parquet sidecars."""
    folder.mkdir(parents=True)
    for s in range(n):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                data = f"shard {s} item {j}".encode()
                info = tarfile.TarInfo(f"{s:05d}{j:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        pq.write_table(pa.table({"status": ["success"] * per_shard}), folder / f"{s:05d}.parquet")
    return folder


def test_download_shards_grouped_into_parts_found_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(part_size, "TARGET_PARTS", 2)  # 7 shards of a small pool: 3 shards a part
    src = _shards(tmp_path / "dl", 7)
    layout = Layout(tmp_path / "out")
    source, opts = Img2datasetOutput(), _Opts(src)
    parts = source.parts(opts, layout)
    assert [p.name for p in parts] == ["00000", "00001", "00002"] and [p.size for p in parts] == [6, 6, 2]
    assert read_groups(layout).per_part == 3  # type: ignore[union-attr]
    monkeypatch.setattr(Path, "glob", lambda *a, **k: pytest.fail("a task listed a folder"))
    part = source.part_named(opts, layout, "00001")  # by name: shards 3, 4, 5
    assert part is not None and [s.caption for s in part.samples()][::2] == ["shard 3 item 0", "shard 4 item 0", "shard 5 item 0"]
    assert source.part_named(opts, layout, "00009") is None


def test_a_build_begun_before_grouping_keeps_one_part_per_shard(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(part_size, "TARGET_PARTS", 2)
    src = _shards(tmp_path / "dl", 4)
    layout = Layout(tmp_path / "out")
    layout.done_marker("embed", "00000").parent.mkdir(parents=True)
    layout.done_marker("embed", "00000").write_text('{"part": "00000", "rows": 2, "failures": {}}')
    assert [p.name for p in Img2datasetOutput().parts(_Opts(src), layout)] == ["00000", "00001", "00002", "00003"]
    # and an explicit --shard-size is one part per shard too
    assert len(Img2datasetOutput().parts(_Opts(src, shard_size=2), Layout(tmp_path / "o2"))) == 4


def test_an_image_folder_is_listed_once_one_row_group_a_part(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "pairs", 10)
    layout = Layout(tmp_path / "out")
    source = ImageFolder()
    parts = source.parts(_Opts(src, shard_size=4), layout)
    assert [p.size for p in parts] == [4, 4, 2]
    first = [s.key for s in parts[1].samples()]
    write_caption_folder(tmp_path / "pairs", 14)  # the folder grows: the build's parts do not
    again = source.part_named(_Opts(src, shard_size=4), layout, "00001")
    assert again is not None and [s.key for s in again.samples()] == first
    assert len(source.parts(_Opts(src, shard_size=4), layout)) == 3
    with pytest.raises(XMError, match="started with other --source/--limit/--shard-size"):
        source.parts(_Opts(src, shard_size=4, limit=5), layout)
    # sized for the folder when --shard-size is not given: 14 images are one part
    assert [p.size for p in source.parts(_Opts(src), Layout(tmp_path / "o2"))] == [14]
