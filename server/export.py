"""`xm export clip-back IDX OUT`: what clip-retrieval's own `clip back` loads.

    OUT/image.index              the coarse encoder's image kNN index, shards merged into one
    OUT/text.index               its caption kNN index (when the index has one)
    OUT/metadata/metadata_<part>.parquet   the caption store in id order (clip back's ids are
                                 row positions over the sorted files), without the id column;
                                 image_path relative to the source, as `xm serve` gives it
    OUT/indices_paths.json       {NAME: {"indice_folder": OUT, "clip_model": "open_clip:ARCH/PRETRAINED", ...}}

    clip-retrieval back --indices-paths OUT/indices_paths.json --port 1234

clip back binds every interface (0.0.0.0, hard-coded), unlike `xm serve`: the export says so.

clip back embeds queries with its own copy of the encoder, so an index built with random
weights (`ARCH:random`) is refused: clip back could not reproduce them. The per-indice
options switch off what clip back would otherwise download at start (M-CLIP, the
aesthetic embeddings, the safety models) and TorchScript, which open_clip models do not need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xm.errors import XMError


def clip_model_name(spec: str) -> str:
    from xm.encoders import EncoderSpec

    s = EncoderSpec.parse(spec)
    if s.is_random:
        raise XMError(f"encoder {spec}: random weights, which clip back cannot reproduce (it loads weights by name); "
                      "export an index built with pretrained weights or a checkpoint file")
    pretrained = str(Path(s.pretrained).resolve()) if s.is_path else s.pretrained
    return f"open_clip:{s.arch}/{pretrained}"


def merge_shards(memory: Any, spec: str, modality: str) -> Any:
    """One FAISS index equal to the union of the shards (ids are the global ids)."""
    import faiss

    from xm.indexes.shards import set_params

    entry = memory.index_entry(spec, modality)
    shards_meta = sorted(entry.shards, key=lambda s: s.id_range[0])
    folder = memory.root / entry.dir
    ends = [list(s.id_range) for s in shards_meta]
    if ends[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ends, ends[1:])) or ends[-1][1] != memory.count:
        raise XMError(f"{folder}: shard id ranges {ends} do not cover 0..{memory.count} contiguously")
    shards = [faiss.read_index(str(folder / s.file)) for s in shards_meta]
    merged = shards[0]
    try:
        ivf = faiss.extract_index_ivf(merged)
    except RuntimeError:
        ivf = None
    for s in shards[1:]:
        if ivf is not None:  # IVF shards share the trained quantizer; their stored ids are global
            ivf.merge_from(faiss.extract_index_ivf(s), 0)
            merged.ntotal = ivf.ntotal
        else:  # flat, HNSW, ...: local ids, contiguous ranges in order: append the vectors
            try:
                merged.merge_from(s, 0)
            except RuntimeError:
                merged.add(s.reconstruct_n(0, s.ntotal))
    if merged.ntotal != memory.count:
        raise XMError(f"{folder}: merged index holds {merged.ntotal} vectors, the manifest says {memory.count}")
    set_params(merged, entry.params)  # nprobe / efSearch are saved with the index
    return merged


def _check_merged(memory: Any, spec: str, modality: str, merged: Any, n: int = 16) -> None:
    """The merged index answers as the shards do, on a sample of the memory's own vectors."""
    if not memory.has_embeddings(spec, modality):
        return
    rng = np.random.default_rng(0)
    ids = rng.choice(memory.count, size=min(n, memory.count), replace=False)
    q = memory.embeddings(spec, modality).gather(ids)
    k = min(10, memory.count)
    d1, i1 = memory.search(modality, q, k, encoder=spec)
    d2, i2 = merged.search(np.ascontiguousarray(q, np.float32), k)
    if not np.allclose(d1, d2, atol=1e-4):
        raise XMError(f"{memory.root}: the merged {modality} index answers differently from its shards")


def export_clip_back(index: str | Path, out: str | Path, name: str | None = None, force: bool = False) -> dict[str, Any]:
    import faiss
    import pyarrow.parquet as pq

    from xm.indexes.layout import atomic_path, write_json
    from xm.memories import open_index

    memory = open_index(index)
    spec = memory.roles["coarse"]
    model = clip_model_name(spec)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise XMError(f"{out}: exists and is not empty; choose a new folder or pass --force")
    if not memory.has_index(spec, "image"):
        raise XMError(f"{memory.root}: no image kNN index for {spec}; clip back needs one")
    name = name or Path(memory.root).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for modality in ("image", "text"):
        if not memory.has_index(spec, modality):
            continue
        merged = merge_shards(memory, spec, modality)
        _check_merged(memory, spec, modality, merged)
        target = out / f"{modality}.index"
        with atomic_path(target) as tmp:
            faiss.write_index(merged, str(tmp))
        written.append(target.name)
        del merged
    meta_dir = out / "metadata"
    meta_dir.mkdir(exist_ok=True)
    for stale in meta_dir.glob("*.parquet"):
        stale.unlink()
    expect = 0
    columns: list[str] = []
    # clip-retrieval's metadata/ parts are written from the caption store, the one owner of the rows
    for part, rows in zip(memory.parts, memory.part_rows):
        table = memory.store.table(expect, expect + rows)
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(expect, expect + rows)):
            raise XMError(f"{memory.root / 'store'}: ids of part {part} are not {expect}..{expect + rows - 1} in order")
        expect += rows
        table = table.drop_columns(["id"])  # image_path stays relative to the source, as `xm serve` gives it
        columns = table.column_names
        with atomic_path(meta_dir / f"metadata_{part}.parquet") as tmp:
            pq.write_table(table, tmp)
    if expect != memory.count:
        raise XMError(f"{memory.root}: the parts hold {expect} rows, the manifest says {memory.count}")
    indices = {name: {"indice_folder": str(out.resolve()), "clip_model": model, "columns_to_return": columns,
                      "enable_mclip_option": False, "use_jit": False, "provide_safety_model": False,
                      "provide_violence_detector": False, "provide_aesthetic_embeddings": False}}
    write_json(out / "indices_paths.json", indices)
    return {"name": name, "out": str(out), "clip_model": model, "count": memory.count, "indexes": written,
            "metadata_files": len(memory.parts), "columns": columns, "indices_paths": str(out / "indices_paths.json"),
            "run": f"clip-retrieval back --indices-paths {out / 'indices_paths.json'} --port 1234",
            "warning": CLIP_BACK_LISTENS}


# clip back binds 0.0.0.0 (hard-coded; it has no --host), where `xm serve` binds 127.0.0.1
CLIP_BACK_LISTENS = ("clip back listens on every network interface (0.0.0.0, not configurable): anyone who can "
                     "reach this machine's port can query the index; run it behind a firewall")
