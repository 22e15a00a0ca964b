"""A simulated 400M memory: what opening a memory of 40,000 parts costs (the part count, not the
rows, is what breaks a reader that opens every part: one file and one map per part per matrix).

    .venv/bin/python bench/bench_parts.py [--parts 40000] [--rows 3] [--store-shard-rows R] [--compare] [--json] [--out FILE]

The memory is written with xm's own writers, not by running an encoder 40,000 times (this
measures the reader): per part image and caption embeddings and caption norms (.npy,
float16/float32, the layout's names), the caption store (`write_store_shard`: Arrow IPC shards
of R ids, by default `store.SHARD_ROWS`), then one exact kNN index over every row
(`write_shards`) and the manifest (`write_manifest`, which keeps parts and files in Parquet
tables past `INLINE_FILES`). Then, in a fresh process under `ulimit -n 1024` (RLIMIT_NOFILE),
it is opened (`open_index`), searched (one image query, k=10), and captions and embeddings of
128 random ids fetched; reported: open time, peak RSS, open files and memory maps after the
fetches, manifest bytes (manifest.json and its tables), fetch latency, caption bytes on disk.
Goal (issue 19): open < 5 s, < 1,000 maps and files, 128-id fetch < 50 ms.

`--compare` also measures the layout of memories built before the store shards, in the same
run: a copy of the memory (embeddings and index hard-linked) whose rows are in a Parquet store
part per embedding part plus the first encoder's `metadata/` part (captions stored twice, as
those builds did), with its own manifest; both are probed one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENCODER = "xm-tiny-vit:random"  # a name only: no encoder is loaded
DIM = 16


def build(out: Path, parts: int, rows: int, dim: int = DIM, seed: int = 0, shard_rows: int | None = None) -> dict:
    """Write a memory of `parts` parts of `rows` rows with xm's writers (a caption store of
    `shard_rows` ids a shard: default `store.SHARD_ROWS`); return what it took."""
    import faiss
    import pyarrow as pa

    from xm.encoders import EncoderSpec
    from xm.indexes.layout import Layout, atomic_path, part_name
    from xm.indexes.manifest import write_manifest
    from xm.indexes.records import (
        STORE_SHARDS,
        BuildStats,
        EncoderEntry,
        IndexEntry,
        Manifest,
        PartEntry,
        Roles,
        ShardEntry,
        SourceEntry,
        StoreEntry,
    )
    from xm.indexes.shards import write_shards
    from xm.indexes.store import SHARD_ROWS, shard_ranges, write_store_shard

    t0 = time.perf_counter()
    layout = Layout(out)
    slug = EncoderSpec.parse(ENCODER).slug
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    hashes, images, tables = [], [], []
    shard_rows = shard_rows or SHARD_ROWS
    names = [part_name(i) for i in range(parts)]

    def save(path: Path, array: np.ndarray) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
        files.append(path)

    for i, name in enumerate(names):
        first = i * rows
        captions = [f"caption of item {first + j}" for j in range(rows)]
        table = pa.table({"caption": captions, "url": [f"http://127.0.0.1/{first + j}.jpg" for j in range(rows)],
                          "source_id": [str(first + j) for j in range(rows)]})
        tables.append(table)
        vec = rng.standard_normal((rows, dim)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        images.append(vec)
        save(layout.emb_file(slug, "image", name), vec.astype(np.float16))
        save(layout.emb_file(slug, "text", name), vec[::-1].astype(np.float16))
        save(layout.norm_file(slug, "text", name), np.full(rows, 2.0, np.float32))
    whole = pa.concat_tables(tables)
    for i, (start, stop) in enumerate(shard_ranges(parts * rows, shard_rows)):
        hashes.append(write_store_shard([whole.slice(start, stop - start)], start, layout.store_shard(i)))
        files.append(layout.store_shard(i))
    with atomic_path(layout.caption_hash) as tmp, open(tmp, "wb") as f:
        np.save(f, np.concatenate(hashes))
    files.append(layout.caption_hash)
    t_parts = time.perf_counter() - t0
    index = faiss.IndexFlatIP(dim)
    index.add(np.concatenate(images))
    infos = write_shards(index, 1, lambda i: layout.shard_file(slug, "image", i))
    files += [layout.index_dir(slug, "image") / s.file for s in infos]
    count = parts * rows
    manifest = Manifest(
        count=count,
        source=SourceEntry(kind="bench", source="bench_parts", limit=None, parts=None, shard_size=rows),
        roles=Roles(coarse=ENCODER, fine=ENCODER, inference=[ENCODER]),
        encoders={ENCODER: EncoderEntry(slug=slug, dim=dim, logit_scale=100.0, probe=None, embedded=["image", "text"],
                                        norms=["text"], precision=None)},
        parts=[PartEntry(name=n, rows=rows) for n in names],
        indexes=[IndexEntry(key="Flat", params="", metric="ip", dim=dim,
                            shards=[ShardEntry(file=s.file, ntotal=s.ntotal, id_offset=s.id_offset, id_range=s.id_range) for s in infos],
                            k_target=10, encoder=ENCODER, modality="image", dir=layout.rel(layout.index_dir(slug, "image")))],
        stats=BuildStats(failures={}, selected=count, empty_captions=0),
        store=StoreEntry(format=STORE_SHARDS, shard_rows=shard_rows),
    )
    t1 = time.perf_counter()
    write_manifest(layout, manifest, files)
    return {"parts": parts, "rows_per_part": rows, "items": count, "files": len(files),
            "write_parts_s": round(t_parts, 1), "write_manifest_s": round(time.perf_counter() - t1, 1)}


def legacy_copy(root: Path, dest: Path) -> dict:
    """`root` as a memory built before the store shards would have it: the same embeddings and
    index (hard links), its rows in a Parquet store part per part (`write_store_part`) and in the
    first encoder's metadata/ part (the embed stage's copy), a manifest without a `store` entry."""
    import shutil
    from dataclasses import replace

    import pyarrow.parquet as pq

    from xm.indexes.layout import Layout, atomic_path
    from xm.indexes.manifest import read_manifest, write_manifest
    from xm.indexes.store import open_store, write_store_part

    t0 = time.perf_counter()
    shutil.copytree(root, dest, copy_function=os.link, ignore=shutil.ignore_patterns("store", "manifest*"))
    (dest / "store").mkdir()
    os.link(root / "store" / "caption_hash.npy", dest / "store" / "caption_hash.npy")
    new, old = Layout(root), Layout(dest)
    manifest = read_manifest(root)
    store = open_store(new, manifest)
    slug = next(iter(manifest.encoders.values())).slug
    files = [dest / rel for rel in manifest.files if not rel.startswith("store/rows-")]
    first = 0
    for part in manifest.parts:
        table = store.table(first, first + part.rows).drop_columns(["id"])
        write_store_part(table, first, old.store_part(part.name))
        # the embed stage's metadata part: image_path first, pyarrow's default compression
        with atomic_path(old.metadata_file(slug, part.name)) as tmp:
            pq.write_table(table, tmp)
        files += [old.store_part(part.name), old.metadata_file(slug, part.name)]
        first += part.rows
    write_manifest(old, replace(manifest, store=None), files, known=manifest.files)
    return {"legacy_copy_s": round(time.perf_counter() - t0, 1)}


def caption_bytes(root: Path) -> dict:
    """Bytes on disk of the rows (captions, urls, source ids) in the memory's files."""
    def total(paths: list[Path]) -> int:
        return sum(p.stat().st_size for p in paths)

    store = [p for p in (root / "store").iterdir() if p.name != "caption_hash.npy"]
    metadata = list((root / "embeddings").glob("*/metadata/*.parquet"))
    return {"store_files": len(store), "store_bytes": total(store), "metadata_files": len(metadata),
            "metadata_bytes": total(metadata), "caption_hash_bytes": (root / "store" / "caption_hash.npy").stat().st_size}


# the measurement, run in a fresh process under the descriptor limit
PROBE = r"""
import json, os, resource, sys, time
import numpy as np
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
from xm.memories import open_index
maps_before = sum(1 for _ in open("/proc/self/maps"))
t0 = time.perf_counter()
m = open_index(sys.argv[1])
t_open = time.perf_counter() - t0
rng = np.random.default_rng(1)
ids = rng.choice(m.count, 128, replace=False)
q_id = int(ids[0])
q = m.embeddings(m.roles["coarse"], "image").gather(ids[:1])
t0 = time.perf_counter()
sims, hits = m.search("image", q, 10)
t_search = time.perf_counter() - t0
fetch, cpu = [], []
for seed in range(int(sys.argv[3])):  # fresh ids each time: no row group cached from the run before
    ids = np.random.default_rng(100 + seed).choice(m.count, 128, replace=False)
    t0, c0 = time.perf_counter(), time.process_time()
    caps = m.captions(ids)
    fetch.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    assert caps == [f"caption of item {i}" for i in ids], "wrong captions"
t0 = time.perf_counter()
rows = m.embeddings(m.roles["coarse"], "text").gather(ids)
norms = m.norms(m.roles["coarse"], "text")[ids]
t_gather = time.perf_counter() - t0
assert rows.shape == (128, m.embeddings(m.roles["coarse"], "text").dim) and (norms == 2.0).all()
maps = sum(1 for _ in open("/proc/self/maps"))
own = sum(1 for line in open("/proc/self/maps") if sys.argv[1] in line)  # maps of the memory's own files
fds = len(os.listdir("/proc/self/fd"))
print(json.dumps({"open_s": round(t_open, 3), "search_ms": round(t_search * 1e3, 2),
                  "captions_128_ms": [round(t * 1e3, 1) for t in fetch],
                  "captions_128_cpu_ms": [round(t * 1e3, 1) for t in cpu],
                  "gather_128_ms": round(t_gather * 1e3, 1), "top1_is_query": int(hits[0, 0]) == q_id,
                  "open_files": fds, "memory_maps": maps, "memory_maps_of_the_memory": own, "cached_open": len(m.opened),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "nofile_limit": limit, "memory_maps_before_open": maps_before}))
"""


def probe(root: Path, nofile: int = 1024, repeats: int = 5) -> dict:
    """Open, search and fetch from `root` in a fresh process under RLIMIT_NOFILE `nofile`
    (`repeats` fetches of 128 fresh random ids)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(root), str(nofile), str(repeats)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed under ulimit -n {nofile}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def percentiles(ms: list[float]) -> dict:
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1), "n": len(ms)}


def manifest_bytes(root: Path) -> dict:
    tables = sorted((root / "manifest").glob("*.parquet")) if (root / "manifest").is_dir() else []
    return {"manifest.json": (root / "manifest.json").stat().st_size, **{f"manifest/{t.name}": t.stat().st_size for t in tables}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=40_000)
    ap.add_argument("--rows", type=int, default=3, help="rows per part")
    ap.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE of the process that opens the memory")
    ap.add_argument("--store-shard-rows", type=int, default=None,
                    help="ids per caption-store shard (default: store.SHARD_ROWS); small values simulate a 400M memory's hundreds of shards")
    ap.add_argument("--repeats", type=int, default=20, help="fetches of 128 fresh random ids (p50/p95 over them)")
    ap.add_argument("--compare", action="store_true", help="also probe the layout of memories built before the store shards")
    ap.add_argument("--keep", type=Path, default=None,
                    help="build the memory here and keep it (default: a temporary folder); one already there is measured again")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    import tempfile

    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "memory"
        reuse = args.keep is not None and (args.keep / "manifest.json").is_file()
        result["build"] = {"reused": str(root)} if reuse else build(root, args.parts, args.rows, shard_rows=args.store_shard_rows)
        result["manifest_bytes"] = manifest_bytes(root)
        result["caption_bytes"] = caption_bytes(root)
        result["open"] = probe(root, args.nofile, args.repeats)
        result["fetch_ms"] = percentiles(result["open"]["captions_128_ms"])
        result["goal_met"] = {"open_under_5s": result["open"]["open_s"] < 5,
                              "under_1000_maps_and_files": result["open"]["memory_maps"] < 1000 and result["open"]["open_files"] < 1000,
                              "fetch_p95_under_50ms": result["fetch_ms"]["p95"] < 50}
        if args.compare:
            legacy = Path(tmp) / "legacy" if args.keep is None else args.keep.with_name(args.keep.name + "-legacy")
            before: dict = {"build": {"reused": str(legacy)} if (legacy / "manifest.json").is_file() else legacy_copy(root, legacy)}
            before["caption_bytes"] = caption_bytes(legacy)
            before["open"] = probe(legacy, args.nofile, args.repeats)
            before["fetch_ms"] = percentiles(before["open"]["captions_128_ms"])
            result["before_store_shards"] = before
            result["ratio_before_over_after"] = {
                "fetch_p50": round(before["fetch_ms"]["p50"] / max(result["fetch_ms"]["p50"], 1e-3), 1),
                "fetch_p95": round(before["fetch_ms"]["p95"] / max(result["fetch_ms"]["p95"], 1e-3), 1),
                "caption_bytes": round((before["caption_bytes"]["store_bytes"] + before["caption_bytes"]["metadata_bytes"])
                                       / max(result["caption_bytes"]["store_bytes"], 1), 2)}
    text = json.dumps(result, indent=None if args.json else 2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
