"""Encode EuroSAT splits once under one encoder (image embeddings, float16, resumable in
chunks), for bench_reco.py's end-to-end sweep. Training never decodes images; this is
the one pass that does.

    python bench/eurosat_embed.py --data /work/shared/data/eurosat --encoder ViT-B-32:random --out /tmp/xm-reco-bench
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data/eurosat")
    ap.add_argument("--encoder", default="ViT-B-32:random")
    ap.add_argument("--out", default="/tmp/xm-reco-bench")
    ap.add_argument("--splits", default="test,train,validation")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from xm.encoders import load_encoder

    enc = load_encoder(a.encoder)
    out = Path(a.out) / enc.spec.slug
    out.mkdir(parents=True, exist_ok=True)
    for split in a.splits.split(","):
        df = pd.read_csv(Path(a.data) / f"{split}.csv")
        files = df.Filename.tolist()
        chunks = []
        for c, lo in enumerate(range(0, len(files), a.chunk)):
            f = out / f"{split}-{c:04d}.npy"
            if not f.is_file():
                t = time.time()
                ims = [Image.open(Path(a.data) / p).convert("RGB") for p in files[lo:lo + a.chunk]]
                emb = enc.encode_images(ims).astype(np.float16)
                tmp = f.with_suffix(".tmp.npy")
                np.save(tmp, emb)
                tmp.rename(f)
                print(f"{split} {lo + len(ims)}/{len(files)} {len(ims) / (time.time() - t):.1f} img/s", flush=True)
            chunks.append(np.load(f))
        np.save(out / f"{split}.npy", np.concatenate(chunks))
        np.save(out / f"{split}-labels.npy", df.Label.to_numpy(np.int64))
        print(f"{split}: done", flush=True)


if __name__ == "__main__":
    main()
