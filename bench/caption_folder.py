"""Turn a labelled dataset split into a memory source: a folder of image links with
same-name .txt captions made from the class names (for demos and benchmarks).

A memory captioned with training labels makes every retrieval method a labelled
nearest-neighbour classifier: results over it are a mechanics check, not zero-shot.

    .venv/bin/python bench/caption_folder.py --dataset eurosat --data-dir ../shared/data/eurosat \
        --split train --out /tmp/eurosat-train-captions [--limit N] [--template "a centered satellite photo of {}."]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from xm.evaluation.datasets import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--template", default="a photo of a {}.")
    args = ap.parse_args()
    ds = load_dataset(args.dataset, args.data_dir, args.split)
    items = ds.items
    if args.limit:
        items = [items[i] for i in np.sort(np.random.default_rng(0).choice(len(items), args.limit, replace=False))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n, item in enumerate(items):
        stem = item.key.replace("/", "__").rsplit(".", 1)[0]
        link = out / f"{stem}{item.path.suffix}"
        if not link.exists():
            os.symlink(item.path.resolve(), link)
        # distinct strings (exact-duplicate captions are dropped from a pool), the label said once
        (out / f"{stem}.txt").write_text(f"{args.template.format(ds.classnames[item.label])} (image {n})")
    print(f"{len(items)} captioned images in {out} (captioned with their labels: a labelled nearest-neighbour "
          "memory, not a zero-shot one)")


if __name__ == "__main__":
    main()
