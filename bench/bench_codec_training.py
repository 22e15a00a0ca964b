"""What polysemous training costs a PQ codec that never searches by Hamming distance.

    .venv/bin/python bench/bench_codec_training.py [--rows 65536] [--dim 512] [--codecs PQ64,OPQ32,PQ32]

faiss's factory turns polysemous training on for every PQ; xm's codecs (`--text-codec`,
`indexes/codecs.py`) only encode and decode, so `make_codec` turns it off. This trains each
codec on the same synthetic unit vectors both ways and reports the seconds and the
reconstruction error (which polysemous training does not change: it only re-orders centroids).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=65_536, help="training rows (codecs.TRAIN_ROWS by default)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--codecs", default="PQ64,OPQ32,PQ32")
    args = ap.parse_args()
    import faiss

    from xm.indexes.codecs import decode, encode, make_codec

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
                            f"load average {os.getloadavg()[0]:.2f} at start", "rows": args.rows, "dim": args.dim}
    for codec in args.codecs.split(";") if ";" in args.codecs else _split(args.codecs):
        row = {}
        for polysemous in (True, False):
            index = make_codec(codec, args.dim)  # polysemous training off (xm's codec)
            if polysemous:  # as faiss's factory made it
                inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
                inner.do_polysemous_training = True
            t0 = time.perf_counter()
            index.train(x)
            seconds = time.perf_counter() - t0
            err = float(np.mean(np.sum((decode(index, encode(index, x[:4096])) - x[:4096]) ** 2, axis=1)))
            row["with_polysemous" if polysemous else "xm"] = {"train_s": round(seconds, 2), "mse": round(err, 5)}
        out[codec] = row
        print(json.dumps({codec: row}), flush=True)
    print(json.dumps(out))


def _split(codecs: str) -> list[str]:
    """'PQ64,OPQ32,PQ32' -> ['PQ64', 'OPQ32,PQ32']: an OPQ prefix belongs to the PQ after it."""
    parts, out = codecs.split(","), []
    for p in parts:
        if out and out[-1].startswith("OPQ") and "," not in out[-1]:
            out[-1] += "," + p
        else:
            out.append(p)
    return out


if __name__ == "__main__":
    main()
