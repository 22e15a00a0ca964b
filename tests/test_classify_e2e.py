"""X-MoRe end to end with small random-init architectures over a near-duplicate memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, TINY_ROLES, TINY_WIDE, make_image, near_duplicate
from xm.classify import Classifier
from xm.encoders import load_encoder
from xm.errors import XMError
from xm.pipeline import BuildConfig, build_index

CLASSES = ["red fox", "blue tram", "green parrot", "stone bridge", "paper kite", "copper kettle"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}, seen up close."]
N_QUERIES = 36
DUPS = len(TEMPLATES)


def build_memory(root: Path) -> tuple[Path, list[Path], list[int]]:
    """Queries with class labels, and a memory of their near-duplicates captioned with the class,
    plus unrelated distractors with random captions."""
    rng = np.random.default_rng(0)
    labels = [int(i % len(CLASSES)) for i in range(N_QUERIES)]
    qdir, mdir = root / "queries", root / "memory"
    qdir.mkdir(parents=True)
    mdir.mkdir(parents=True)
    queries = []
    for i, y in enumerate(labels):
        img = make_image(i)
        queries.append(qdir / f"q{i:03d}.jpg")
        img.save(queries[-1], quality=95)
        for j in range(DUPS):
            near_duplicate(img, 100 * i + j).save(mdir / f"m{i:03d}_{j}.jpg", quality=95)
            # each near-duplicate captioned with one of its class's prompts: distinct strings,
            # so exact-string de-duplication keeps all of them
            (mdir / f"m{i:03d}_{j}.txt").write_text(TEMPLATES[j].format(CLASSES[y]))
    for i in range(60):
        make_image(5000 + i).save(mdir / f"z{i:03d}.jpg")
        (mdir / f"z{i:03d}.txt").write_text(f"holiday snapshot {i} with {CLASSES[rng.integers(len(CLASSES))]} maybe")
    build_index(BuildConfig(source=str(mdir), out=root / "idx", **TINY_ROLES))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root / "idx", queries, labels


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return build_memory(tmp_path_factory.mktemp("xmore"))


def _accuracy(index: Path, queries, labels, method: str = "xmore", **kw) -> tuple[float, list[dict]]:
    # caption_prefix "": the tiny random text tower is no CLIP, and the authors' prefix swamps what
    # its captions say (the prefix itself: test_authors_protocol.py)
    options = {} if method == "clip" else {"k_coarse": DUPS, "k_fine": 2, "caption_prefix": "", **kw}
    clf = Classifier(index, CLASSES, method=method, model=TINY, templates=TEMPLATES, options=options)
    results = list(clf.run(queries))
    return float(np.mean([r["prediction"] == CLASSES[y] for r, y in zip(results, labels)])), results


def test_xmore_beats_image_only_by_far(memory) -> None:
    index, queries, labels = memory
    clip_acc, _ = _accuracy(index, queries, labels, method="clip")
    xmore_acc, results = _accuracy(index, queries, labels, method="xmore-minmax")
    text_acc, _ = _accuracy(index, queries, labels, method="captions")
    # measured: clip 0.17 (chance for 6 classes), text 0.83, modal 0.69
    assert text_acc >= 0.75 and xmore_acc >= 0.6, (xmore_acc, text_acc)
    assert xmore_acc >= clip_acc + 0.4, (clip_acc, xmore_acc)
    assert [r["stream_position"] for r in results] == list(range(1, N_QUERIES + 1))
    # the same image twice is two queries of the stream
    twice = list(Classifier(index, CLASSES, model=TINY, templates=TEMPLATES, options={"k_coarse": DUPS, "k_fine": 2}).run([queries[0], queries[0]], batch_size=2))
    assert [r["stream_position"] for r in twice] == [1, 2] and twice[0]["top5"] == twice[1]["top5"]


def test_image_ensemble_is_plain_zero_shot_clip(memory) -> None:
    """--ensemble image against an independent open_clip computation."""
    index, queries, _ = memory
    _, results = _accuracy(index, queries[:5], [0] * 5, ensemble="image")
    _, plain = _accuracy(index, queries[:5], [0] * 5, method="clip")
    for a, b in zip(results, plain):  # --ensemble image is the clip method
        assert [t["class"] for t in a["top5"]] == [t["class"] for t in b["top5"]]
        assert [t["prob"] for t in a["top5"]] == pytest.approx([t["prob"] for t in b["top5"]], abs=1e-12)
    enc = load_encoder(TINY)
    model, tok = enc.model, enc.tokenizer
    with torch.no_grad():
        w = torch.stack([  # CLIP's template averaging, written out
            torch.nn.functional.normalize(model.encode_text(tok([t.format(c) for t in TEMPLATES])), dim=-1).mean(0)
            for c in CLASSES
        ])
        w = w / w.norm(dim=-1, keepdim=True)
        for path, r in zip(queries[:5], results):
            x = enc.preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
            f = model.encode_image(x)
            f = f / f.norm(dim=-1, keepdim=True)
            p = (model.logit_scale.exp() * f @ w.T).softmax(-1)[0].double().numpy()
            for t in r["top5"]:
                assert t["prob"] == pytest.approx(p[CLASSES.index(t["class"])], abs=1e-6)
                assert t["p_img"] == pytest.approx(t["prob"], abs=1e-12)


def test_explain_shows_the_kept_captions(memory) -> None:
    index, queries, labels = memory
    clf = Classifier(index, CLASSES, model=TINY, templates=TEMPLATES, options={"k_coarse": DUPS, "k_fine": 2})
    r = next(iter(clf.run(queries[:1], explain=True)))
    assert len(r["captions"]) == 2
    for c in r["captions"]:
        assert c["caption"] in {t.format(CLASSES[labels[0]]) for t in TEMPLATES}
        assert c["vote"] == CLASSES[labels[0]]
    sims = [c["fine_similarity"] for c in r["captions"]]
    assert sims == sorted(sims, reverse=True)


def test_state_file_continues_a_stream(memory, tmp_path) -> None:
    index, queries, _ = memory
    opts = {"k_coarse": DUPS, "k_fine": 2}
    whole = list(Classifier(index, CLASSES, model=TINY, options=opts, state_file=None).run(queries[:6]))
    state = tmp_path / "stream.json"
    first = Classifier(index, CLASSES, model=TINY, options=opts, state_file=state)
    list(first.run(queries[:3]))
    first.save_state()
    second = list(Classifier(index, CLASSES, model=TINY, options=opts, state_file=state).run(queries[3:6]))
    for a, b in zip(whole[3:], second):
        assert a["weights"] == pytest.approx(b["weights"]) and a["stream_position"] == b["stream_position"]
    with pytest.raises(XMError, match="another index, label set"):
        Classifier(index, CLASSES[:-1], model=TINY, options=opts, state_file=state)


def _xm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xm.cli", *args], capture_output=True, text=True)


def test_cli_classify_json_and_bad_inputs(memory, tmp_path) -> None:
    index, queries, labels = memory
    root = index.parent
    gray, rgba, cmyk, deep = (tmp_path / n for n in ("g.png", "a.png", "c.jpg", "d.png"))
    Image.open(queries[0]).convert("L").save(gray)
    Image.open(queries[0]).convert("RGBA").save(rgba)
    Image.open(queries[0]).convert("CMYK").save(cmyk)
    Image.fromarray(np.asarray(Image.open(queries[0]).convert("L")).astype(np.uint16) * 257).save(deep)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8garbage")
    args = ["classify", str(queries[0]), str(tmp_path / "missing.jpg"), str(corrupt), str(gray), str(rgba), str(cmyk),
            str(deep), "--labels", str(root / "classes.txt"), "--index", str(index), "--model", TINY, "--json",
            "--k-coarse", "3", "--k-fine", "2"]
    out = _xm(*args)
    assert out.returncode == 1
    lines = [json.loads(text) for text in out.stdout.splitlines()]
    assert len(lines) == 7 and [record["image"] for record in lines] == args[1:8]
    assert [("error" in record) for record in lines] == [False, True, True, False, False, False, False]
    assert lines[0]["prediction"] == CLASSES[labels[0]]
    errs = [line for line in out.stderr.splitlines() if line.startswith("xm: error")]
    assert any("missing.jpg: no such image file" in e for e in errs) and any("corrupt.jpg: not a readable image" in e for e in errs)
    assert len(errs) == 2

    table = _xm("classify", str(queries[1]), "--labels", str(root / "classes.txt"), "--index", str(index), "--model", TINY,
                "--explain", "--timings")
    assert table.returncode == 0 and "captions used" in table.stdout and "knn" in table.stdout

    def fails(*extra: str, labels_text: str | None = None, index_path: Path = index) -> str:
        lab = root / "classes.txt"
        if labels_text is not None:
            lab = tmp_path / "lab.txt"
            lab.write_text(labels_text)
        r = _xm("classify", str(queries[0]), "--labels", str(lab), "--index", str(index_path), "--model", TINY, *extra)
        assert r.returncode not in (0, None)
        err = [line for line in r.stderr.splitlines() if line.startswith("xm: error")]
        assert len(err) == 1, r.stderr
        return err[0]

    assert "duplicate label" in fails(labels_text="cat\ndog\ncat\n")
    assert "no labels" in fails(labels_text="\n# none\n")
    assert "lab.txt" in fails(labels_text="cat\ndog\ncat\n")
    assert "not found" in _xm("classify", str(queries[0]), "--labels", str(tmp_path / "nope.txt"), "--index", str(index)).stderr


def test_mismatched_or_damaged_index_refused(memory, tmp_path) -> None:
    index, queries, _ = memory
    import shutil

    from conftest import write_caption_folder
    from xm.encoders import loader

    # an index built with a checkpoint whose file later holds other weights
    enc = load_encoder(TINY)
    ckpt = tmp_path / "coarse.pt"
    torch.save(enc.model.state_dict(), ckpt)
    spec = f"xm-tiny-vit:{ckpt}"
    write_caption_folder(tmp_path / "pairs", 8)
    build_index(BuildConfig(source=str(tmp_path / "pairs"), out=tmp_path / "ck", coarse=spec, fine=TINY_WIDE, inference=[spec]))
    torch.save({k: v + 0.05 if v.is_floating_point() else v for k, v in enc.model.state_dict().items()}, ckpt)
    loader._loaded.clear()
    with pytest.raises(XMError, match="other weights than the ones that built this index"):
        Classifier(tmp_path / "ck", CLASSES, model=TINY, options={"k_coarse": 4, "k_fine": 2})

    other = tmp_path / "copy"
    shutil.copytree(index, other)
    next((other / "index").glob("*/image/shard-*.index")).write_bytes(b"garbage")
    with pytest.raises(XMError, match="shard-000.index"):
        Classifier(other, CLASSES, model=TINY, options={"k_coarse": 4, "k_fine": 2})
    # an inference encoder the index has no caption embeddings for still works (computed on the fly)
    r = next(iter(Classifier(index, CLASSES, model=TINY_WIDE, options={"k_coarse": DUPS, "k_fine": 2}).run(queries[:1])))
    assert r["prediction"] in CLASSES
