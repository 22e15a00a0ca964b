"""A corpus of bad inputs and faults, each run as a real `xm` command: every one must end in
a non-zero exit with one `xm: error:` line (or, for a batch, that line per bad image), never
a traceback, a crash (a signal) or a silent success.

    .venv/bin/python bench/hostile_corpus.py [--jobs 2] [--keep DIR]

Prints one line per case and a summary line; exits 1 if any case misbehaved.
`tests/test_hostile_corpus.py` runs it in CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TINY, WIDE = "xm-tiny-vit:random", "xm-tiny-vit-wide:random"
ROLES = ["--coarse", TINY, "--fine", WIDE, "--inference", TINY]


@dataclass
class Case:
    name: str
    args: list[str]
    expect_exit: tuple[int, ...] = (1, 2)  # a bad input is exit 2; a batch with bad items exit 1
    expect_text: str = ""  # must appear in the error line(s)


@dataclass
class Outcome:
    case: Case
    code: int
    stderr: str
    verdict: str  # ok | traceback | crash | wrong exit | unclear


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def fixtures(root: Path) -> dict[str, Path]:
    """A small index, images, label files and other files the cases point at."""
    rng = np.random.default_rng(0)
    pairs = root / "pairs"
    pairs.mkdir(parents=True)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((64, 64), Image.NEAREST).save(pairs / f"{i:03d}.jpg")
        (pairs / f"{i:03d}.txt").write_text(f"a photo of thing {i % 4}")
    idx = root / "idx"
    out = subprocess.run([sys.executable, "-m", "xm.cli", "build-index", "--source", str(pairs), "--out", str(idx), *ROLES],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"fixture build failed: {out.stderr}")
    f = {"pairs": pairs, "idx": idx, "image": pairs / "000.jpg"}
    f["labels"] = root / "labels.txt"
    f["labels"].write_text("thing 0\nthing 1\nthing 2\nthing 3\n")
    for name, data in {"bomb.png": _bomb(), "corrupt.jpg": b"\xff\xd8 not a jpeg", "empty.jpg": b"",
                       "labels-latin1.txt": "caf\xe9\nth\xe9\n".encode("latin-1"), "labels-empty.txt": b"\n# only a comment\n",
                       "labels-one.txt": b"just one\n", "labels-dup.txt": b"cat\ndog\ncat\n", "labels-case.txt": b"Cat\ndog\ncat \n",
                       "garbage.parquet": b"PAR1 garbage", "pairs.xlsx": b"PK\x03\x04", "state-bad.json": b"{not json",
                       "pickle.pt": pickle.dumps({"not": "weights"}), "templates-bad.txt": b"no placeholder here\n"}.items():
        (root / name).write_bytes(data)
        f[name] = root / name
    (root / "nourl.csv").write_text("link,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    (root / "nocap.csv").write_text("url,text\nhttp://127.0.0.1:9/a.jpg,a\n")
    (root / "empty.csv").write_text("url,caption\n")
    # only local files: refused whole (a table with some http(s) URLs builds, the others counted as failures)
    (root / "fileurl.csv").write_text("url,caption\nfile:///etc/passwd,secrets\nfile:///etc/shadow,more\n")
    for n in ("nourl.csv", "nocap.csv", "empty.csv", "fileurl.csv"):
        f[n] = root / n
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.tex").write_text("precious")
    (root / "noimages").mkdir()
    (root / "noimages" / "readme.txt").write_text("no pictures")
    (root / "badimages").mkdir()
    for i in range(3):
        (root / "badimages" / f"{i}.jpg").write_bytes(b"broken")
    (root / "afile.txt").write_text("x")
    for cls in ("thing a", "thing b"):
        (root / "dataset" / cls).mkdir(parents=True)
        shutil.copy(pairs / "000.jpg", root / "dataset" / cls / "000.jpg")
    (root / "emptydir").mkdir()
    for name, manifest in (("garbled-index", "{not json"), ("future-index", json.dumps({"format": "xm-index/99"}))):
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(manifest)
    damaged = root / "damaged-index"
    shutil.copytree(idx, damaged)
    shard = next(damaged.glob("index/*/image/shard-*.index"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    other_state = root / "state-other.json"
    other_state.write_text(json.dumps({"stream_key": "0" * 16, "state": {"count": 1, "min": {}, "max": {}, "sum": {}}}))
    f.update({"foreign": root / "foreign", "noimages": root / "noimages", "badimages": root / "badimages",
              "afile": root / "afile.txt", "emptydir": root / "emptydir", "garbled": root / "garbled-index",
              "future": root / "future-index", "damaged": damaged, "dataset": root / "dataset", "state-other": other_state, "root": root})
    return f


def cases(f: dict[str, Path]) -> list[Case]:
    s = {k: str(v) for k, v in f.items()}
    out = str(f["root"] / "out")  # cases that never get as far as writing share it
    build = ["build-index", "--out", out, *ROLES]
    cls = ["classify", s["image"], "--labels", s["labels"], "--index", s["idx"]]
    c = [
        # build-index: sources
        Case("source does not exist", build + ["--source", s["root"] + "/nope"], expect_text="no such file"),
        Case("source of unsupported table type", build + ["--source", s["pairs.xlsx"]], expect_text="unsupported table"),
        Case("table without the url column", build + ["--source", s["nourl.csv"]], expect_text="no column 'url'"),
        Case("table without the caption column", build + ["--source", s["nocap.csv"]], expect_text="no column 'caption'"),
        Case("table with no rows", build + ["--source", s["empty.csv"]]),
        Case("corrupt parquet table", build + ["--source", s["garbage.parquet"]], expect_text="unreadable table"),
        Case("only file:// URLs in a table", build + ["--source", s["fileurl.csv"]], expect_text="is http(s)"),
        Case("folder with no images", build + ["--source", s["noimages"]], expect_text="no images found"),
        Case("folder of undecodable images", build + ["--source", s["badimages"]], expect_text="no usable image-text pairs"),
        Case("laion400m offline, empty metadata root", build + ["--source", "laion400m", "--metadata-root", s["emptydir"]],
             expect_text="--metadata-root"),
        Case("precomputed embeddings with --limit", build + ["--source", "laion400m-embeddings", "--limit", "5",
                                                             "--embeddings-root", s["emptydir"]]),
        # build-index: options
        Case("--batch-size 0", build + ["--source", s["pairs"], "--batch-size", "0"], expect_text="--batch-size"),
        Case("--batch-size -1", build + ["--source", s["pairs"], "--batch-size", "-1"], expect_text="--batch-size"),
        Case("--shards 0", build + ["--source", s["pairs"], "--shards", "0"], expect_text="--shards"),
        Case("--limit 0", build + ["--source", s["pairs"], "--limit", "0"], expect_text="--limit"),
        Case("--k 0", build + ["--source", s["pairs"], "--k", "0"], expect_text="--k"),
        Case("--max-index-memory lots", build + ["--source", s["pairs"], "--max-index-memory", "lots"], expect_text="--max-index-memory"),
        Case("--current-memory equal to the budget", build + ["--source", s["pairs"], "--max-index-memory", "4G",
                                                                "--current-memory", "4G"], expect_text="--current-memory"),
        Case("--out is a file", ["build-index", "--source", s["pairs"], "--out", s["afile"], *ROLES], expect_text="is a file"),
        Case("--out is a foreign folder", ["build-index", "--source", s["pairs"], "--out", s["foreign"], *ROLES],
             expect_text="not an xm index"),
        Case("--stages unknown", build + ["--source", s["pairs"], "--stages", "embed,fly"], expect_text="--stages"),
        Case("--distributor unknown", build + ["--source", s["pairs"], "--distributor", "carrier-pigeon"], expect_text="--distributor"),
        Case("--parts malformed", build + ["--source", "laion400m", "--parts", "x-y"]),
        Case("--encoder without parts", build + ["--source", s["pairs"], "--encoder", TINY], expect_text="--encoder"),
        Case("--encoder with unknown parts", build + ["--source", s["pairs"], "--encoder", f"{TINY}=pixels"], expect_text="pixels"),
        Case("encoder of unknown architecture", ["build-index", "--source", s["pairs"], "--out", out, "--coarse", "ViT-Q-99:random",
                                                 "--fine", WIDE, "--inference", TINY], expect_text="unknown architecture"),
        Case("encoder with an unknown pretrained tag", ["build-index", "--source", s["pairs"], "--out", out, "--coarse",
                                                        "ViT-B-32:nonesuch", "--fine", WIDE, "--inference", TINY]),
        Case("encoder checkpoint that does not exist", ["build-index", "--source", s["pairs"], "--out", out, "--coarse",
                                                        f"xm-tiny-vit:{s['root']}/none.pt", "--fine", WIDE, "--inference", TINY],
             expect_text="does not exist"),
        Case("encoder checkpoint that is a pickle", ["build-index", "--source", s["pairs"], "--out", out, "--coarse",
                                                     f"xm-tiny-vit:{s['pickle.pt']}", "--fine", WIDE, "--inference", TINY]),
        Case("encoder spec without a colon", ["build-index", "--source", s["pairs"], "--out", out, "--coarse", "ViT-B-32",
                                              "--fine", WIDE, "--inference", TINY], expect_text="ARCH:PRETRAINED"),
        Case("resume with other encoders", ["build-index", "--source", s["pairs"], "--out", s["idx"], "--coarse", WIDE,
                                            "--fine", WIDE, "--inference", TINY], expect_text="other encoders"),
        Case("--add-encoder on a non-index", ["build-index", "--out", s["foreign"], "--add-encoder", f"{WIDE}=text"]),
        Case("--add-encoder with --source", ["build-index", "--out", s["idx"], "--source", s["pairs"], "--add-encoder", f"{WIDE}=text"]),
        Case("--add-encoder with a bad part", ["build-index", "--out", s["idx"], "--add-encoder", f"{WIDE}=everything"]),
        Case("no --source at all", ["build-index", "--out", out], expect_text="--source"),
        # classify: images
        Case("image that does not exist", ["classify", s["root"] + "/none.jpg", "--labels", s["labels"], "--index", s["idx"]],
             expect_text="no such image"),
        Case("corrupt image", ["classify", s["corrupt.jpg"], "--labels", s["labels"], "--index", s["idx"]], expect_text="not a readable image"),
        Case("empty image file", ["classify", s["empty.jpg"], "--labels", s["labels"], "--index", s["idx"]]),
        Case("decompression bomb", ["classify", s["bomb.png"], "--labels", s["labels"], "--index", s["idx"]], expect_text="megapixels"),
        Case("a directory as image", ["classify", s["emptydir"], "--labels", s["labels"], "--index", s["idx"]], expect_text="directory"),
        # classify: labels
        Case("labels missing", ["classify", s["image"], "--labels", s["root"] + "/none.txt", "--index", s["idx"]], expect_text="not found"),
        Case("labels not UTF-8", ["classify", s["image"], "--labels", s["labels-latin1.txt"], "--index", s["idx"]], expect_text="UTF-8"),
        Case("labels empty", ["classify", s["image"], "--labels", s["labels-empty.txt"], "--index", s["idx"]], expect_text="no labels"),
        Case("a single label", ["classify", s["image"], "--labels", s["labels-one.txt"], "--index", s["idx"]], expect_text="at least two"),
        Case("duplicate labels", ["classify", s["image"], "--labels", s["labels-dup.txt"], "--index", s["idx"]], expect_text="duplicate"),
        Case("labels the tokenizer cannot tell apart", ["classify", s["image"], "--labels", s["labels-case.txt"], "--index", s["idx"]],
             expect_text="tokenizer"),
        # classify: index and options
        Case("index folder missing", ["classify", s["image"], "--labels", s["labels"], "--index", s["root"] + "/none"],
             expect_text="no such index"),
        Case("index folder that is not an index", ["classify", s["image"], "--labels", s["labels"], "--index", s["pairs"]],
             expect_text="not a finished xm index"),
        Case("manifest that is not JSON", ["classify", s["image"], "--labels", s["labels"], "--index", s["garbled"]],
             expect_text="unreadable manifest"),
        Case("manifest of an unknown format", ["classify", s["image"], "--labels", s["labels"], "--index", s["future"]],
             expect_text="format"),
        Case("damaged shard", ["classify", s["image"], "--labels", s["labels"], "--index", s["damaged"]], expect_text="damaged"),
        Case("unknown method", cls + ["--method", "telepathy"], expect_text="unknown"),
        Case("--opt without =", cls + ["--opt", "k_fine"], expect_text="NAME=VALUE"),
        Case("--opt the method does not take", cls + ["--opt", "warp=9"], expect_text="does not take"),
        Case("--opt of the wrong type", cls + ["--opt", "k_coarse=many"], expect_text="is not an int"),
        Case("--k-coarse 0", cls + ["--k-coarse", "0"], expect_text="minimum"),
        Case("--k-fine above --k-coarse", cls + ["--k-coarse", "4", "--k-fine", "8"], expect_text="exceeds"),
        Case("--ensemble unknown", cls + ["--ensemble", "vibes"], expect_text="choose from"),
        Case("--protocol unknown", cls + ["--protocol", "folklore"], expect_text="--protocol"),
        Case("template without a placeholder", cls + ["--template", "a photo"], expect_text="template"),
        Case("--state that is not JSON", cls + ["--state", s["state-bad.json"]], expect_text="unreadable stream state"),
        Case("--state of another stream", cls + ["--state", s["state-other"]], expect_text="another index"),
        Case("--batch-size 0 for classify", cls + ["--batch-size", "0"]),
        Case("--model of unknown architecture", cls + ["--model", "ViT-Q-99:random"], expect_text="unknown architecture"),
        Case("few-shot method in classify", cls + ["--method", "coder-adapter"], expect_text="few-shot"),
        Case("reco without a trained checkpoint", cls + ["--method", "reco"], expect_text="xm train reco"),
        # search and info
        Case("search with both image and text", ["search", s["idx"], "--image", s["image"], "--text", "x"], expect_text="exactly one"),
        Case("search -k 0", ["search", s["idx"], "--text", "x", "-k", "0"], expect_text="-k"),
        Case("search of an unknown modality", ["search", s["idx"], "--text", "x", "--modality", "smell"], expect_text="modality"),
        Case("info on a missing folder", ["info", s["root"] + "/none"], expect_text="no such index"),
        Case("info --verify of a damaged index", ["info", s["damaged"], "--verify"], expect_text="checksum"),
        # benchmark
        Case("benchmark of an unknown dataset", ["benchmark", "--dataset", "nonesuch", "--data-dir", s["pairs"], "--index", s["idx"]],
             expect_text="unknown"),
        Case("benchmark data folder missing", ["benchmark", "--dataset", "eurosat", "--data-dir", s["root"] + "/none", "--index", s["idx"]],
             expect_text="no such data folder"),
        Case("benchmark --seeds not integers", ["benchmark", "--dataset", "imagefolder", "--data-dir", s["dataset"], "--index", s["idx"],
                                                 "--seeds", "a,b"], expect_text="--seeds"),
        Case("benchmark --shots empty", ["benchmark", "--dataset", "imagefolder", "--data-dir", s["dataset"], "--index", s["idx"],
                                         "--shots", ","], expect_text="--shots"),
        Case("benchmark --templates unknown", ["benchmark", "--dataset", "imagefolder", "--data-dir", s["dataset"], "--index", s["idx"],
                                               "--templates", "sonnets"], expect_text="--templates"),
        Case("benchmark of a split that is not there", ["benchmark", "--dataset", "eurosat", "--data-dir", s["pairs"], "--index", s["idx"],
                                                        "--split", "holdout"]),
        Case("indexes --default unknown", ["indexes", "--default", "nonesuch"], expect_text="no complete index"),
        Case("texts with missing labels", ["texts", "--labels", s["root"] + "/none.txt", "--out", s["root"] + "/t.json"]),
        Case("train reco on a missing index", ["train", "reco", "--index", s["root"] + "/none"]),
    ]
    return c


def run_case(case: Case, env: dict[str, str], root: Path) -> Outcome:
    # each build gets its own --out: a failed build keeps its resumable state, by design
    slug = "".join(ch if ch.isalnum() else "-" for ch in case.name)
    args = [str(root / "outs" / slug) if a == str(root / "out") else a for a in case.args]
    try:
        r = subprocess.run([sys.executable, "-m", "xm.cli", *args], capture_output=True, text=True, timeout=300,
                           env=env, stdin=subprocess.DEVNULL)
        code, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        return Outcome(case, -1, "timed out", "crash")
    errors = [line for line in err.splitlines() if line.startswith("xm: error:") or line.startswith("Error:") or "Error: " in line[:20]]
    if "Traceback" in err:
        verdict = "traceback"
    elif code < 0:
        verdict = "crash"
    elif code not in case.expect_exit:
        verdict = "wrong exit"
    elif not errors or (case.expect_text and not any(case.expect_text in e for e in errors)):
        verdict = "unclear"
    else:
        verdict = "ok"
    return Outcome(case, code, err, verdict)


def run_corpus(root: Path, jobs: int = 2) -> list[Outcome]:
    import os

    f = fixtures(root)
    env = {**os.environ, "XM_HOME": str(root / "home")}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: run_case(c, env, root), cases(f)))


def summary(outcomes: list[Outcome]) -> str:
    count = {v: sum(o.verdict == v for o in outcomes) for v in ("traceback", "crash", "wrong exit", "unclear")}
    return (f"{len(outcomes)} bad inputs: {count['traceback']} tracebacks, {count['crash']} crashes, "
            f"{count['wrong exit']} wrong exit codes, {count['unclear']} unclear")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="build the fixtures here and keep them")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="xm-corpus-"))
    outcomes = run_corpus(root, a.jobs)
    for o in outcomes:
        last = next((line for line in reversed(o.stderr.splitlines()) if line.strip()), "")
        print(f"{o.verdict:10} exit {o.code:3}  {o.case.name}: {last[:150]}", flush=True)
    print(summary(outcomes))
    if a.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if any(o.verdict != "ok" for o in outcomes) else 0)


if __name__ == "__main__":
    main()
