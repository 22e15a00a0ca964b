"""Loopback load on `xm serve`: N concurrent clients for S seconds against a large memory.

    .venv/bin/python bench/bench_server.py [--items 100000] [--clients 50] [--seconds 60] [--json]

The memory is bench_classify's synthetic index (embedding parts in clip-retrieval's layout
from random unit vectors, then the real index, store and manifest stages), here with the
tiny test encoders so that the figures measure the service (HTTP, batching across requests,
FAISS, the caption store, X-MoRe's retrieval) rather than a CPU's ViT-L forward pass;
`--real-encoders` uses bench_classify's RN50 / ViT-B-32 / ViT-L-14 sizes instead.

Each client holds one keep-alive connection and sends, back to back:
  /knn-service  exactly what ClipClient sends for an image query (num_images 40, deduplicate on)
  /classify     an image, 10 labels, method xmore with its defaults (K=128, k=16), explanation
                included, on the client's own stream id
Reported per endpoint: requests, errors (any non-200 or failed connection), throughput,
latency p50 / p90 / p99 / max, and the server's mean encoder batch size (from /metrics).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
LAUNCH = "import xm.cli.serve_cmd; from xm.cli.app import main; main()"
TINY, TINY_WIDE = "xm-tiny-vit:random", "xm-tiny-vit-wide:random"


def build(root: Path, items: int, real: bool) -> Path:
    import bench_classify

    if (root / "manifest.json").is_file():
        return root
    return bench_classify.synthetic_index(root, items, encoders=None if real else (TINY, TINY_WIDE, TINY))


def start(index: Path, workers: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", f"bench={index}", "--port", "0", "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise SystemExit(f"xm serve did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def payloads(n: int = 8) -> dict[str, list[bytes]]:
    from PIL import Image

    rng = np.random.default_rng(2)
    imgs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        imgs.append(base64.b64encode(buf.getvalue()).decode())
    knn = [json.dumps({"text": None, "image": b, "image_url": None, "embedding_input": None, "deduplicate": True,
                       "use_safety_model": True, "use_violence_detector": True, "indice_name": "bench", "use_mclip": False,
                       "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 40,
                       "num_result_ids": 40}).encode() for b in imgs]
    labels = [f"class {i}" for i in range(10)]
    classify = [{"image": b, "labels": labels, "method": "xmore", "indice_name": "bench"} for b in imgs]
    return {"/knn-service": knn, "/classify": classify}


def load(port: int, path: str, bodies: list, clients: int, seconds: float) -> dict:
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = c
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            if isinstance(body, dict):  # /classify: this client's own stream
                body = json.dumps({**body, "stream": f"client-{c}"}).encode()
            i += 1
            t = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            lat[c].append(time.perf_counter() - t)
            if not ok:
                errors[c] += 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.array([x for row in lat for x in row]) * 1e3
    return {"requests": int(len(all_lat)), "errors": int(sum(errors)), "wall_s": round(wall, 1),
            "throughput_rps": round(len(all_lat) / wall, 1),
            **{f"p{q}_ms": round(float(np.percentile(all_lat, q)), 1) for q in (50, 90, 99)},
            "max_ms": round(float(all_lat.max()), 1)}


def batch_means(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    sums = dict(re.findall(r'xm_encoder_batch_items_sum\{batcher="([^"]+)"\} ([0-9.]+)', text))
    counts = dict(re.findall(r'xm_encoder_batch_items_count\{batcher="([^"]+)"\} ([0-9.]+)', text))
    return {k: round(float(sums[k]) / max(1.0, float(counts[k])), 2) for k in sums}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=16, help="xm serve --workers")
    ap.add_argument("--endpoints", default="/knn-service,/classify")
    ap.add_argument("--index", type=Path, help="reuse (or build into) this folder instead of a temporary one")
    ap.add_argument("--real-encoders", action="store_true", help="RN50 / ViT-B-32 / ViT-L-14 sizes (random init)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.index or Path(tmp) / "idx"
        t = time.perf_counter()
        index = build(root, args.items, args.real_encoders)
        build_s = time.perf_counter() - t
        proc, port = start(index, args.workers)
        try:
            bodies = payloads()
            out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), python {platform.python_version()}",
                   "items": args.items, "clients": args.clients, "seconds": args.seconds, "workers": args.workers,
                   "encoders": "real sizes (random init)" if args.real_encoders else f"{TINY} / {TINY_WIDE}",
                   "index_build_s": round(build_s, 1)}
            for path in args.endpoints.split(","):
                load(port, path, bodies[path], 2, 3)  # warm: encoders, classifier, caches
                out[path] = load(port, path, bodies[path], args.clients, args.seconds)
                if not args.json:
                    print(path, json.dumps(out[path]), flush=True)
            out["mean_encoder_batch"] = batch_means(port)
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
