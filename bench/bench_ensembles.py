"""Synthetic streams with one informative modality and one noise modality: top-1 of each
ensemble variant against the informative modality alone.

    .venv/bin/python bench/bench_ensembles.py [--n 5000] [--classes 10]
"""

from __future__ import annotations

import argparse

from xm.evaluation.synthetic import VARIANTS, informative_vs_noise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    table = informative_vs_noise(args.n, args.classes)
    print(f"{'informative':12s} {'alone':>7s} {'noise':>7s} " + " ".join(f"{v:>7s}" for v in VARIANTS) + "   (top-1 %; loss vs alone)")
    for informative, row in table.items():
        alone = row["informative alone"]
        cells = " ".join(f"{100 * row[v]:7.1f}" for v in VARIANTS)
        losses = ", ".join(f"{v} -{100 * (alone - row[v]):.1f}" for v in VARIANTS)
        print(f"{informative:12s} {100 * alone:7.1f} {100 * row['noise alone']:7.1f} {cells}   ({losses})")


if __name__ == "__main__":
    main()
