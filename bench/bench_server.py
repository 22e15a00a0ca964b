"""Loopback load on `xm serve`, and side by side with clip-retrieval's own `clip back` on the
same exported index: N concurrent clients for S seconds per endpoint.

    .venv/bin/python bench/bench_server.py [--items 100000] [--clients 50] [--seconds 60] [--json]
    .venv/bin/python bench/bench_server.py --clip-back-python /tmp/cb/bin/python --items 10000 --seconds 20

The memory is bench_classify's synthetic index (embedding parts in clip-retrieval's layout
from random unit vectors, then the real index, store and manifest stages), here with the
tiny test encoders so that the figures measure the service (HTTP, batching across requests,
FAISS, the caption store, X-MoRe's retrieval) rather than a CPU's ViT-L forward pass;
`--real-encoders` uses bench_classify's RN50 / ViT-B-32 / ViT-L-14 sizes instead.

With `--clip-back-python PY` (the python of a separate virtualenv holding clip-retrieval; its
dependencies conflict with xm's), the coarse encoder is a ViT-B-32 checkpoint file (random
init, saved: clip back loads weights by name or path, never `random`), the index is exported
with `xm export clip-back`, and after xm serve's runs the same `/knn-service` load is sent to
`clip back` (bound to 127.0.0.1 by its launcher here; it would bind 0.0.0.0). The servers run
one after the other, never together, on the same cores.

Each client holds one keep-alive connection and sends, back to back:
  /knn-service  exactly what ClipClient sends (num_images 40, deduplicate on, its filter flags),
                with a text query (`--knn-query image`: a 256x256 JPEG)
  /classify     an image, 10 labels, method xmore with its defaults (K=128, k=16), explanation
                included, on the client's own stream id (xm only: clip back has none)
Reported per endpoint and server: requests, errors (any non-200 or failed connection),
throughput, latency p50 / p90 / p99 / max, and xm's mean encoder batch size (from /metrics).
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


# clip back binds 0.0.0.0 and has no option for it: this launcher keeps it on loopback
CLIP_BACK = ("import sys, flask, fire; run = flask.Flask.run; "
             "flask.Flask.run = lambda self, host=None, port=None, **kw: run(self, host='127.0.0.1', port=port, **kw); "
             "from clip_retrieval.clip_back import clip_back; sys.argv[0] = 'clip back'; fire.Fire(clip_back)")


def build(root: Path, items: int, real: bool, coarse: str | None = None) -> Path:
    import bench_classify

    if (root / "manifest.json").is_file():
        return root
    encoders = None if real else (coarse or TINY, TINY_WIDE, TINY)
    return bench_classify.synthetic_index(root, items, encoders=encoders)


def checkpoint(root: Path) -> str:
    """A ViT-B-32 with random init, saved as a checkpoint file both servers load by path."""
    import torch

    from xm.encoders import load_encoder

    ckpt = root / "vitb32-random.pt"
    if not ckpt.is_file():
        root.mkdir(parents=True, exist_ok=True)
        torch.save(load_encoder("ViT-B-32:random", quiet=True).model.state_dict(), ckpt)
    return f"ViT-B-32:{ckpt}"


def start(index: Path, workers: int, concurrency: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", f"bench={index}", "--port", "0", "--workers", str(workers),
                             "--concurrency", str(concurrency)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on"):
        proc.kill()
        raise SystemExit(f"xm serve did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_clip_back(python: str, indices_paths: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "-c", CLIP_BACK, "--indices_paths", str(indices_paths), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=indices_paths.parent)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"clip back exited ({proc.returncode}); its log: {log}\n{log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/indices-list")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"clip back did not answer within 600 s; its log: {log}")


def export(index: Path, out: Path) -> Path:
    if not (out / "indices_paths.json").is_file():
        r = subprocess.run([sys.executable, "-c", "import xm.cli.export_cmd; from xm.cli.app import main; main()", "export",
                            "clip-back", str(index), str(out), "--name", "bench"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"xm export clip-back failed: {r.stderr[-2000:]}")
    return out / "indices_paths.json"


def payloads(n: int = 8, knn_query: str = "image") -> dict[str, list[bytes]]:
    from PIL import Image

    rng = np.random.default_rng(2)
    imgs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        imgs.append(base64.b64encode(buf.getvalue()).decode())
    texts = [f"a photo of a {w}" for w in ("cat", "tram", "bridge", "parrot", "fox", "mountain", "boat", "clock")]
    queries = [{"image": b} for b in imgs] if knn_query == "image" else [{"text": t, "image": None} for t in texts[:n]]
    knn = [json.dumps({"text": None, **q, "image_url": None, "embedding_input": None, "deduplicate": True,
                       "use_safety_model": True, "use_violence_detector": True, "indice_name": "bench", "use_mclip": False,
                       "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 40,
                       "num_result_ids": 40}).encode() for q in queries]
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
    ap.add_argument("--workers", type=int, default=1, help="xm serve --workers (processes)")
    ap.add_argument("--concurrency", type=int, default=16, help="xm serve --concurrency (requests computed at once per process)")
    ap.add_argument("--endpoints", default="/knn-service,/classify")
    ap.add_argument("--knn-query", choices=("image", "text"), default=None,
                    help="what /knn-service queries carry (default: text with --clip-back-python, else image)")
    ap.add_argument("--index", type=Path, help="reuse (or build into) this folder instead of a temporary one")
    ap.add_argument("--real-encoders", action="store_true", help="RN50 / ViT-B-32 / ViT-L-14 sizes (random init)")
    ap.add_argument("--clip-back-python", help="python of a virtualenv with clip-retrieval: also load its own clip back")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    knn_query = args.knn_query or ("text" if args.clip_back_python else "image")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.index or Path(tmp) / "idx"
        t = time.perf_counter()
        coarse = checkpoint(root.parent / "ckpt") if args.clip_back_python else None
        index = build(root, args.items, args.real_encoders, coarse)
        build_s = time.perf_counter() - t
        bodies = payloads(knn_query=knn_query)
        out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
                                f"python {platform.python_version()}",
                     "items": args.items, "clients": args.clients, "seconds": args.seconds, "knn_query": knn_query,
                     "xm": {"workers": args.workers, "concurrency": args.concurrency},
                     "encoders": "real sizes (random init)" if args.real_encoders else f"{coarse or TINY} / {TINY_WIDE} / {TINY}",
                     "index_build_s": round(build_s, 1)}
        proc, port = start(index, args.workers, args.concurrency)
        try:
            for path in args.endpoints.split(","):
                load(port, path, bodies[path], 2, 3)  # warm: encoders, classifier, caches
                out["xm"][path] = load(port, path, bodies[path], args.clients, args.seconds)
                if not args.json:
                    print("xm serve", path, json.dumps(out["xm"][path]), flush=True)
            out["xm"]["mean_encoder_batch"] = batch_means(port)
        finally:
            proc.terminate()
            proc.wait(30)
        if args.clip_back_python:
            paths = export(index, root.parent / "clip-back")
            cb, cb_port = start_clip_back(args.clip_back_python, paths, root.parent / "clip-back.log")
            try:
                load(cb_port, "/knn-service", bodies["/knn-service"], 2, 3)
                out["clip_back"] = {"/knn-service": load(cb_port, "/knn-service", bodies["/knn-service"], args.clients, args.seconds)}
                if not args.json:
                    print("clip back", "/knn-service", json.dumps(out["clip_back"]["/knn-service"]), flush=True)
            finally:
                cb.terminate()
                try:
                    cb.wait(30)
                except subprocess.TimeoutExpired:
                    cb.kill()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
