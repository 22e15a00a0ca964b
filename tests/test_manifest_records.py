"""The manifest's typed records: JSON -> records -> JSON is the same document, byte for byte
(so a rewrite of unchanged content changes nothing), format 1 is read as format 2, and a
damaged field is refused in one line naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, TINY_ROLES, TINY_WIDE, write_caption_folder
from xm.errors import XMError
from xm.indexes import read_manifest
from xm.indexes.layout import Layout, write_json
from xm.indexes.manifest import upgrade_v1, write_manifest
from xm.indexes.records import NOT_RECORDED, Manifest
from xm.memories import open_index
from xm.pipeline import BuildConfig, build_index


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    src = write_caption_folder(root / "pairs", 12)
    build_index(BuildConfig(source=str(src), out=root / "idx", **TINY_ROLES))
    return root / "idx"


def _as_written(data: dict) -> str:
    """The bytes xm writes for a manifest (layout.write_json)."""
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def test_a_built_manifest_round_trips_byte_for_byte(built) -> None:
    text = (built / "manifest.json").read_text()
    m = Manifest.from_json(json.loads(text))
    assert _as_written(m.to_json()) == text
    assert Manifest.from_json(m.to_json()) == m
    assert m == read_manifest(built) and m.encoders[TINY].embedded == ["image", "text"] and m.roles.fine == TINY_WIDE
    assert m.index_entry(TINY, "image").shards[0].id_range == (0, 12) and m.files[next(iter(m.files))].mtime_ns


def test_optional_keys_round_trip_in_the_writers_order(built) -> None:
    """What only some builds write (precomputed arrays, codecs, a refine factor, an unloaded
    encoder's null precision) and what older manifests lack stay as they were."""
    data = json.loads((built / "manifest.json").read_text())
    enc = data["encoders"][TINY]
    enc |= {"probe": None, "precision": None, "precomputed": {"image": "datacomp:b32_img"}, "codecs": {"text": "SQ8"}}
    index = data["indexes"][0]
    data["indexes"][0] = {**{k: index[k] for k in ("key", "params", "metric", "dim", "shards", "k_target")},
                          "refine_k_factor": 4, **{k: index[k] for k in ("encoder", "modality", "dir")}}
    del data["encoders"][TINY_WIDE]["precision"], data["stats"]["empty_captions"]
    data["source"].pop("shard_size", None)  # absent: parts sized for the memory (no --shard-size), or format 1
    m = Manifest.from_json(data)
    assert m.encoders[TINY].codecs == {"text": "SQ8"} and m.indexes[0].refine_k_factor == 4
    assert m.encoders[TINY].precision is None and m.encoders[TINY_WIDE].precision is NOT_RECORDED
    assert _as_written(m.to_json()) == _as_written(data)


def _legacy_upgrade_v1(manifest: dict) -> dict:
    """How format 1 was read as format 2 before the records (the dict it gave `xm info --json`)."""
    m = dict(manifest)
    m["format"] = "xm-index/2"
    m["format_read"] = "xm-index/1"
    m["encoders"] = {spec: {**{k: v for k, v in e.items() if k != "modalities"}, "embedded": list(e["modalities"]), "norms": []}
                     for spec, e in manifest["encoders"].items()}
    m["indexes"] = [{**entry, "modality": modality, "dir": f"index/{modality}"} for modality, entry in manifest["indexes"].items()]
    return m


def _v1(built: Path) -> dict:
    """A format-1 manifest as xm wrote them: roles only, indexes by modality, no norms, no
    precision, no shard size, files without mtimes."""
    m = json.loads((built / "manifest.json").read_text())
    return {"format": "xm-index/1", "id": "v1index00000000", "created": m["created"], "count": m["count"],
            "source": {k: m["source"][k] for k in ("kind", "source", "limit", "parts")}, "roles": m["roles"],
            "encoders": {s: {"slug": e["slug"], "dim": e["dim"], "logit_scale": e["logit_scale"], "probe": e["probe"],
                             "modalities": e["embedded"]} for s, e in m["encoders"].items()},
            "parts": m["parts"],
            "indexes": {e["modality"]: {k: e[k] for k in ("key", "params", "metric", "dim", "shards", "k_target", "encoder")}
                        for e in m["indexes"]},
            "stats": {"failures": m["stats"]["failures"], "selected": m["stats"]["selected"]}, "versions": m["versions"],
            "files": {rel: {"bytes": f["bytes"], "sha256": f["sha256"]} for rel, f in m["files"].items()}}


def test_a_format_1_manifest_reads_as_the_same_format_2_document(built, tmp_path) -> None:
    v1 = _v1(built)
    m = upgrade_v1(v1)
    assert m.format == "xm-index/2" and m.format_read == "xm-index/1" and m.encoders[TINY].norms == []
    assert m.index_entry(TINY, "text").dir == "index/text" and m.files[next(iter(m.files))].mtime_ns is None
    assert _as_written(m.to_json()) == _as_written(_legacy_upgrade_v1(v1))
    assert Manifest.from_json(m.to_json()) == m
    target = tmp_path / "v1"
    target.mkdir()
    (target / "manifest.json").write_text(json.dumps(v1))
    assert read_manifest(target) == m


def test_the_writer_stamps_and_keeps_an_unchanged_manifest(built, tmp_path) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    layout = Layout(copy)
    before = read_manifest(copy)
    mtime = layout.manifest.stat().st_mtime_ns
    files = [copy / rel for rel in before.files]
    again = write_manifest(layout, before, files, keep_if_same=True)
    assert again == before and layout.manifest.stat().st_mtime_ns == mtime
    # a format-1 manifest handed to the writer comes out as format 2, without format_read
    written = write_manifest(layout, upgrade_v1(_v1(built)), files)
    on_disk = json.loads(layout.manifest.read_text())
    assert on_disk["format"] == "xm-index/2" and "format_read" not in on_disk and written == read_manifest(copy)


@pytest.mark.parametrize(("edit", "field", "expected"), [
    (lambda m: m["encoders"][TINY].update(dim="512"), f"encoders[{TINY}].dim", "is a string, expected an integer"),
    (lambda m: m["indexes"][0]["shards"][0].update(id_range=[0]), "indexes[0].shards[0].id_range", "expected a list of two integers"),
    (lambda m: m.update(count=12.0), "count", "is a number, expected an integer"),
    (lambda m: m["roles"].pop("fine"), "roles.fine", "is missing"),
    (lambda m: m["files"].update({"x": []}), "files[x]", "is a list, expected an object"),
    (lambda m: m["encoders"][TINY_WIDE].update(codecs={"text": 8}), f"encoders[{TINY_WIDE}].codecs", "expected an object of strings"),
])
def test_a_wrong_field_is_refused_in_one_line_naming_it(built, tmp_path, edit, field, expected) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    write_json(copy / "manifest.json", data)
    with pytest.raises(XMError) as err:
        open_index(copy)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{copy / 'manifest.json'}: field {field} ")
    assert expected in message
