"""A simulated 400M memory: what opening a memory of 40,000 parts costs (the part count, not the
rows, is what breaks a reader that opens every part: one file and one map per part per matrix).

    .venv/bin/python bench/bench_parts.py [--parts 40000] [--rows 3] [--json] [--out FILE]

The memory is written with xm's own writers, not by running an encoder 40,000 times (this
measures the reader): per part a caption-store part (`write_store_part`), image and caption
embeddings and caption norms (.npy, float16/float32, the layout's names), then one exact kNN
index over every row (`write_shards`) and the manifest (`write_manifest`, which keeps parts and
files in Parquet tables past `INLINE_FILES`). Then, in a fresh process under `ulimit -n 1024`
(RLIMIT_NOFILE), it is opened (`open_index`), searched (one image query, k=10), and
captions and embeddings of 128 random ids fetched; reported: open time, peak RSS, open files
and memory maps after the fetches, manifest bytes (manifest.json and its tables), fetch latency.
Goal (issue 19): open < 5 s, < 1,000 maps and files, 128-id fetch < 50 ms.
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


def build(out: Path, parts: int, rows: int, dim: int = DIM, seed: int = 0) -> dict:
    """Write a memory of `parts` parts of `rows` rows with xm's writers; return what it took."""
    import faiss
    import pyarrow as pa

    from xm.encoders import EncoderSpec
    from xm.indexes.layout import Layout, atomic_path, part_name
    from xm.indexes.manifest import write_manifest
    from xm.indexes.records import BuildStats, EncoderEntry, IndexEntry, Manifest, PartEntry, Roles, ShardEntry, SourceEntry
    from xm.indexes.shards import write_shards
    from xm.indexes.store import write_store_part

    t0 = time.perf_counter()
    layout = Layout(out)
    slug = EncoderSpec.parse(ENCODER).slug
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    hashes, images = [], []
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
        hashes.append(write_store_part(table, first, layout.store_part(name)))
        files.append(layout.store_part(name))
        vec = rng.standard_normal((rows, dim)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        images.append(vec)
        save(layout.emb_file(slug, "image", name), vec.astype(np.float16))
        save(layout.emb_file(slug, "text", name), vec[::-1].astype(np.float16))
        save(layout.norm_file(slug, "text", name), np.full(rows, 2.0, np.float32))
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
    )
    t1 = time.perf_counter()
    write_manifest(layout, manifest, files)
    return {"parts": parts, "rows_per_part": rows, "items": count, "files": len(files),
            "write_parts_s": round(t_parts, 1), "write_manifest_s": round(time.perf_counter() - t1, 1)}


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
for seed in range(5):  # fresh ids each time: no row group cached from the run before
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


def probe(root: Path, nofile: int = 1024) -> dict:
    """Open, search and fetch from `root` in a fresh process under RLIMIT_NOFILE `nofile`."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(root), str(nofile)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the probe failed under ulimit -n {nofile}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def manifest_bytes(root: Path) -> dict:
    tables = sorted((root / "manifest").glob("*.parquet")) if (root / "manifest").is_dir() else []
    return {"manifest.json": (root / "manifest.json").stat().st_size, **{f"manifest/{t.name}": t.stat().st_size for t in tables}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=40_000)
    ap.add_argument("--rows", type=int, default=3, help="rows per part")
    ap.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE of the process that opens the memory")
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
        result["build"] = {"reused": str(root)} if reuse else build(root, args.parts, args.rows)
        result["manifest_bytes"] = manifest_bytes(root)
        result["open"] = probe(root, args.nofile)
        result["goal_met"] = {"open_under_5s": result["open"]["open_s"] < 5,
                              "under_1000_maps_and_files": result["open"]["memory_maps"] < 1000 and result["open"]["open_files"] < 1000,
                              "fetch_under_50ms": min(result["open"]["captions_128_ms"]) < 50}
    text = json.dumps(result, indent=None if args.json else 2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
