"""RECO: the fusion model, neighbour tables, training and resuming, checkpoint ties, the method.

Memories are built from generated images with the tiny random-init encoders; under
them every image pair has cosine above 0.96, so the tests pass a near-duplicate
threshold fitted to that space (0.997: the generated near-duplicates are at 0.996-0.999).
"""

from __future__ import annotations

import inspect
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, TINY_WIDE, make_image, near_duplicate
from xm.errors import XMError
from xm.memories import open_index
from xm.methods.base import Context, Example, Queries, Support
from xm.methods.reco_model import build_model, mean_fusion
from xm.methods.registry import create, variants
from xm.pipeline import BuildConfig, build_index
from xm.training.reco import (
    NeighbourRule,
    TrainConfig,
    build_tables,
    reco_loss,
    train_reco,
)

CLASSES = ["red fox", "blue tram", "green parrot", "stone bridge", "paper kite", "copper kettle"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}, seen up close."]
PER_CLASS = 6
DUPS = 3
DUP = 0.997


def _build(root: Path, seed0: int) -> tuple[Path, list, list[int]]:
    """Query images with labels; a memory of DUPS near-duplicates of each, captioned with a
    prompt of its class, and distractors with unrelated captions."""
    src = root / "src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(seed0)
    queries, labels = [], []
    for i in range(len(CLASSES) * PER_CLASS):
        y = i % len(CLASSES)
        img = make_image(seed0 + i)
        queries.append(img)
        labels.append(y)
        for j in range(DUPS):
            near_duplicate(img, seed0 + 100 * i + j).save(src / f"m{i:03d}_{j}.jpg", quality=95)
            (src / f"m{i:03d}_{j}.txt").write_text(TEMPLATES[j].format(CLASSES[y]))
    for i in range(24):
        make_image(seed0 + 5000 + i).save(src / f"z{i:03d}.jpg")
        (src / f"z{i:03d}.txt").write_text(f"holiday snapshot {int(rng.integers(1000))}")
    build_index(BuildConfig(source=str(src), out=root / "idx", coarse=TINY, fine=TINY_WIDE, inference=[TINY]))
    return root / "idx", queries, labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: several torch threads on a busy 2-core machine are 20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("reco"), 0)


@pytest.fixture(scope="module")
def trained(memory, tmp_path_factory):
    """RECO trained on the memory's own pairs, k = DUPS, the item itself only excluded (the
    threshold would also exclude an item's sibling near-duplicates, which are what a query
    retrieves at test time here)."""
    index, _, _ = memory
    out = tmp_path_factory.mktemp("reco-ck") / "ck"
    summary = train_reco(TrainConfig(index=index, out=out, k=DUPS, epochs=40, batch_size=64, lr=3e-3, dup_threshold=1.01))
    return out, summary


def _ctx(index, model=TINY) -> Context:
    return Context(open_index(index), model, CLASSES, TEMPLATES)


def _predict(method, images) -> np.ndarray:
    return method.decide(method.evidence(Queries(images))).probs.argmax(axis=1)


# ------------------------------------------------------------------ model and loss

def test_parameter_count_and_shapes() -> None:
    model = build_model(512)
    # two branches of one pre-LN layer, 8 heads, MLP width 512, plus the logit scale
    assert model.parameter_count() == 3_155_969  # the paper: 3.16M at d = 512
    assert build_model(768).parameter_count() == 7_093_249
    assert model.image is not model.text and model.image.heads == 8
    q, r, valid = torch.randn(5, 512), torch.randn(5, 10, 512), torch.ones(5, 10, dtype=torch.bool)
    out = model.image(q, r, valid)
    assert out.shape == (5, 512)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_fusion_is_a_transformer_layer_read_at_the_query() -> None:
    torch.manual_seed(1)
    d, k = 64, 7
    fusion = build_model(d).image.eval()
    layer = torch.nn.TransformerEncoderLayer(d, fusion.heads, dim_feedforward=d, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True).eval()
    layer.self_attn.load_state_dict(fusion.attn.state_dict())
    layer.norm1.load_state_dict(fusion.ln1.state_dict())
    layer.norm2.load_state_dict(fusion.ln2.state_dict())
    layer.linear1.load_state_dict(fusion.mlp[0].state_dict())
    layer.linear2.load_state_dict(fusion.mlp[2].state_dict())
    q, r = torch.randn(4, d), torch.randn(4, k, d)
    valid = torch.ones(4, k, dtype=torch.bool)
    valid[1, 3:] = False
    with torch.no_grad():
        ours = fusion(q, r, valid)
        pad = torch.cat([torch.zeros(4, 1, dtype=torch.bool), ~valid], 1)
        ref = torch.nn.functional.normalize(layer(torch.cat([q[:, None], r], 1), src_key_padding_mask=pad)[:, 0], dim=-1)
        assert torch.allclose(ours, ref, atol=1e-5)
        # a masked neighbour's content does not matter
        r2 = r.clone()
        r2[1, 5] = 100.0
        assert torch.allclose(fusion(q, r2, valid)[1], ours[1], atol=1e-6)


def test_mean_fusion_leaves_missing_neighbours_out() -> None:
    q = np.array([[1.0, 0.0]], np.float32)
    r = np.array([[[0.0, 1.0], [5.0, 5.0]]], np.float32)
    out = mean_fusion(q, r, np.array([[True, False]]))
    assert out == pytest.approx(np.array([[2 ** -0.5, 2 ** -0.5]]), abs=1e-6)


def test_loss_decreases_over_a_few_steps() -> None:
    torch.manual_seed(0)
    d, n, k = 32, 64, 5
    model = build_model(d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    f = torch.nn.functional.normalize
    v, t = f(torch.randn(n, d), dim=-1), f(torch.randn(n, d), dim=-1)
    v_nb = f(t[:, None] + 0.5 * torch.randn(n, k, d), dim=-1)  # retrieved texts that carry the pair's text
    t_nb = f(v[:, None] + 0.5 * torch.randn(n, k, d), dim=-1)
    valid = torch.ones(n, k, dtype=torch.bool)
    losses = []
    for _ in range(15):
        loss, parts = reco_loss(model, v, t, v_nb, valid, t_nb, valid)
        assert len(parts) == 3
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


# ------------------------------------------------------------------ neighbour tables

def test_item_is_never_its_own_neighbour_nor_its_near_duplicates(memory, tmp_path) -> None:
    index, _, _ = memory
    m = open_index(index)
    k = 6
    tables = build_tables(m, m, TINY, k, NeighbourRule(DUP), tmp_path / "t")
    v = m.embeddings(TINY, "image").gather(np.arange(m.count))
    for modality in ("image", "text"):
        nn = tables[modality]
        assert nn.shape == (m.count, k) and nn.dtype == np.int64
        rows = np.arange(m.count)[:, None]
        assert not (nn == rows).any()
        ok = nn >= 0
        sims = np.einsum("nd,nkd->nk", v, v[np.maximum(nn, 0)])
        assert (sims[ok] < DUP).all()
    # the generated near-duplicates of one image (m<i>_0..2, consecutive ids) above the threshold
    # never retrieve each other, in either table
    dup_pairs = [(a, b) for i in range(0, len(CLASSES) * PER_CLASS * DUPS, DUPS) for a in range(i, i + DUPS)
                 for b in range(i, i + DUPS) if a != b and v[a] @ v[b] >= DUP]
    assert len(dup_pairs) > 20
    for a, b in dup_pairs:
        assert b not in tables["image"][a] and b not in tables["text"][a]
    # without the threshold, an image's nearest neighbours are its own near-duplicates
    plain = build_tables(m, m, TINY, k, NeighbourRule(1.01), tmp_path / "p")["image"]
    assert not (plain == np.arange(m.count)[:, None]).any()
    assert 1 in plain[0][:2]
    # same-caption exclusion on request
    same = build_tables(m, m, TINY, k, NeighbourRule(1.01, exclude_same_caption=True), tmp_path / "c")
    h = np.asarray(m.caption_hashes)
    for modality in ("image", "text"):
        nn = same[modality]
        assert not ((h[np.maximum(nn, 0)] == h[:, None]) & (nn >= 0)).any()


def test_concentrated_space_refuses_the_default_threshold(memory, tmp_path) -> None:
    index, _, _ = memory
    with pytest.raises(XMError, match=r"--dup-threshold 0\.95: .* random image pairs") as e:
        train_reco(TrainConfig(index=index, out=tmp_path / "ck", epochs=1))
    assert "\n" not in str(e.value)


def test_neighbour_tables_resume_after_a_kill(memory, tmp_path) -> None:
    index, _, _ = memory
    m = open_index(index)
    whole = build_tables(m, m, TINY, 4, NeighbourRule(DUP), tmp_path / "whole")

    def killing(label, total):
        def tick(n):
            if label.startswith("neighbours text") and n:
                raise KeyboardInterrupt
        return tick

    with pytest.raises(KeyboardInterrupt):
        build_tables(m, m, TINY, 4, NeighbourRule(DUP), tmp_path / "r", killing, chunk=50)
    meta = json.loads((tmp_path / "r" / "neighbours.json").read_text())
    assert meta["complete"] == {"image": True, "text": False} and meta["rows_done"]["text"] == 50
    again = build_tables(m, m, TINY, 4, NeighbourRule(DUP), tmp_path / "r", chunk=50)
    for modality in ("image", "text"):
        assert np.array_equal(whole[modality], again[modality])
    # other settings recompute, never reuse
    other = build_tables(m, m, TINY, 3, NeighbourRule(DUP), tmp_path / "r")
    assert other["image"].shape[1] == 3


# ------------------------------------------------------------------ training

def test_killed_training_resumes_to_the_same_checkpoint(memory, tmp_path) -> None:
    index, _, _ = memory
    cfg = dict(index=index, epochs=3, batch_size=40, dup_threshold=DUP, seed=7)
    whole = train_reco(TrainConfig(out=tmp_path / "a", **cfg))

    def kill_mid_epoch_two(s):
        if s["epoch"] == 1 and s["step"] == whole.steps // 3 + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reco(TrainConfig(out=tmp_path / "b", **cfg), on_step=kill_mid_epoch_two)
    meta = json.loads((tmp_path / "b" / "reco.json").read_text())
    assert meta["epochs_done"] == 1 and not meta["complete"]
    resumed = train_reco(TrainConfig(out=tmp_path / "b", **cfg))
    assert resumed.resumed_from_epoch == 1 and resumed.steps == whole.steps
    a, b = load_file(str(tmp_path / "a" / "reco.safetensors")), load_file(str(tmp_path / "b" / "reco.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.losses == whole.losses
    # a finished run is left as it is; other settings are refused in one line
    assert train_reco(TrainConfig(out=tmp_path / "b", **cfg)).already_done
    with pytest.raises(XMError, match=r"other settings \(lr=0\.001 \(now 0\.01\)\).*--restart"):
        train_reco(TrainConfig(out=tmp_path / "b", **{**cfg, "lr": 1e-2}))


def test_incomplete_checkpoint_is_refused_by_the_method(memory, tmp_path) -> None:
    index, _, _ = memory

    def stop(s):
        if s["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reco(TrainConfig(index=index, out=tmp_path / "ck", epochs=2, batch_size=64, dup_threshold=DUP), on_step=stop)
    with pytest.raises(XMError, match="stopped after 1 of 2 epochs"):
        create("reco", _ctx(index), checkpoint=str(tmp_path / "ck"))


def test_cli_train_reco(memory, tmp_path) -> None:
    from typer.testing import CliRunner

    from xm.cli.app import _register, app

    _register()
    index, _, _ = memory
    out = tmp_path / "ck"
    r = CliRunner().invoke(app, ["train", "reco", "--index", str(index), "--out", str(out), "--epochs", "1",
                                 "--batch-size", "50", "--dup-threshold", str(DUP), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["epochs_done"] == 1 and summary["parameters"] == build_model(64).parameter_count()
    assert (out / "reco.safetensors").is_file() and (out / "neighbours-image.npy").is_file()
    meta = json.loads((out / "reco.json").read_text())
    assert meta["index_id"] == open_index(index).id and meta["encoder"] == TINY and meta["complete"]


# ------------------------------------------------------------------ the method

def test_reco_beats_clip_on_a_labelled_memory(memory, trained) -> None:
    """Queries whose near-duplicates are in the memory, captioned with their class's prompts:
    a labelled nearest-neighbour setting (not zero-shot). Random tiny CLIP is at chance."""
    index, queries, labels = memory
    out, summary = trained
    assert summary.losses[-1] < summary.losses[0]
    ctx = _ctx(index)
    acc = {}
    for name in ("clip", "reco", "reco-image", "reco-text", "reco-mean"):
        kw = {"checkpoint": str(out)} if name.startswith("reco") and name != "reco-mean" else {}
        if name.startswith("reco"):
            kw["k"] = DUPS
        pred = _predict(create(name, ctx, **kw), queries)
        acc[name] = float(np.mean(pred == np.array(labels)))
    # measured: clip 0.17, reco 0.92, reco-image 0.94, reco-text 0.11, reco-mean 0.83
    assert acc["reco"] >= acc["clip"] + 0.5, acc
    assert acc["reco"] >= 0.8, acc


def test_method_interface_and_explain(memory, trained) -> None:
    index, queries, labels = memory
    out, _ = trained
    ctx = _ctx(index)
    names = {v for v in variants() if v.startswith("reco")}
    assert names == {"reco", "reco-image", "reco-text", "reco-mean", "reco-auto"}
    reco = create("reco", ctx, checkpoint=str(out))
    assert type(reco).trains and {n.kind for n in reco.needs()} == {"embeddings", "index", "trained"}
    assert {n.kind for n in create("reco-mean", ctx).needs()} == {"embeddings", "index"}
    ev = reco.evidence(Queries(queries[:4]))
    assert ev["p_both"].shape == (4, len(CLASSES)) and ev["neighbours"].shape == (4, 10)
    d = reco.decide(ev)
    assert np.allclose(d.probs.sum(axis=1), 1) and set(d.components) == {"p_both", "p_image", "p_text"}
    assert d.info[0] == {"mode": "both", "fusion": "transformer", "neighbours": 10}
    # the modes share one evidence (one cache entry); the checkpoint is part of its key
    image = create("reco-image", ctx, checkpoint=str(out))
    assert image.evidence_key() == reco.evidence_key() != create("reco-mean", ctx).evidence_key()
    assert np.array_equal(image.decide(ev).probs, ev["p_image"])
    x = reco.explain(ev, 0)
    assert len(x["image_neighbours"]) == 10 and x["image_neighbours"][0]["caption"] in {t.format(CLASSES[labels[0]]) for t in TEMPLATES}
    assert len(x["class_prompts"]) == len(TEMPLATES) and x["class_prompts"][0]["retrieved"]


def test_mean_fusion_evidence_worked_out_from_the_memory(memory) -> None:
    """reco-mean's three distributions recomputed from the memory's own kNN and embeddings:
    the image fused with its neighbours' TEXT embeddings, each class prompt with its
    neighbours' IMAGE embeddings (then averaged over templates); id 0 is a neighbour like
    any other. The decision's neighbour count and the explanation follow the evidence."""
    index, queries, _ = memory
    ctx = _ctx(index)
    mem, n = ctx.memory, 6
    spec = mem.roles["coarse"]
    enc = ctx.encoder(spec)
    reco = create("reco-mean", ctx, k=DUPS)
    ev = reco.evidence(Queries(queries[:n]))
    assert (ev["neighbours"] == 0).any()  # query 0's near-duplicates are the memory's first items

    def fused(x: np.ndarray, modality: str, other: str) -> tuple[np.ndarray, np.ndarray]:
        _, ids = mem.search(modality, x, DUPS, encoder=spec)
        out = np.array([q.astype(np.float64) + mem.embeddings(spec, other).gather(row[row >= 0]).astype(np.float64).sum(0)
                        for q, row in zip(x, ids)])
        return out / np.linalg.norm(out, axis=1, keepdims=True), ids

    def per_class(x: np.ndarray) -> np.ndarray:
        w = x.reshape(len(CLASSES), len(TEMPLATES), -1).mean(axis=1)
        return w / np.linalg.norm(w, axis=1, keepdims=True)

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    v = Queries(queries[:n]).features(enc).astype(np.float64)
    v_ref, ids = fused(v, "image", "text")
    prompts = enc.encode_texts([t.format(c) for c in CLASSES for t in TEMPLATES]).astype(np.float64)
    t, t_ref = per_class(prompts), per_class(fused(prompts, "text", "image")[0])
    s = enc.logit_scale
    for mode, (x, w) in {"both": (v_ref, t_ref), "image": (v_ref, t), "text": (v, t_ref)}.items():
        np.testing.assert_allclose(ev[f"p_{mode}"], softmax(s * x @ w.T), atol=1e-4, err_msg=mode)
    assert not np.allclose(ev["p_both"], ev["p_text"], atol=1e-3)  # the image's own fusion shows
    np.testing.assert_array_equal(ev["neighbours"], ids)
    d = reco.decide(ev)
    assert [i["neighbours"] for i in d.info] == (ids >= 0).sum(axis=1).tolist() == [DUPS] * n
    for row in range(n):
        x = reco.explain(ev, row)
        pred = CLASSES[int(ev["p_both"][row].argmax())]
        assert x["predicted"] == pred and [p["prompt"] for p in x["class_prompts"]] == [t.format(pred) for t in TEMPLATES]
        assert [r["id"] for r in x["image_neighbours"]] == ids[row].tolist()


def test_mode_auto_is_chosen_on_the_validation_split(memory, trained) -> None:
    """mode=auto (paper Table 4): the mode of best validation accuracy, recorded; labels of the
    validation split decide it, and without one the method says so in one line."""
    index, queries, labels = memory
    out, _ = trained
    ctx = _ctx(index)
    auto = create("reco-auto", ctx, checkpoint=str(out), k=DUPS)
    assert auto.wants_validation() and not create("reco", ctx, checkpoint=str(out)).wants_validation()
    ev = auto.evidence(Queries(queries[:4]))
    with pytest.raises(XMError, match="mode=auto .* validation split"):
        auto.decide(ev)
    with pytest.raises(XMError, match="mode=auto .* validation split"):
        auto.fit(Support([], [], 0, 0))
    val_images = [near_duplicate(q, 777 + i) for i, q in enumerate(queries)]

    def examples(ys):
        return [Example(lambda im=im: im, int(y), f"v{i}") for i, (im, y) in enumerate(zip(val_images, ys))]

    preds = {m: _predict(create(f"reco-{m}" if m != "both" else "reco", ctx, checkpoint=str(out), k=DUPS), val_images)
             for m in ("both", "image", "text")}
    got = auto.fit(Support([], examples(labels), 0, 0))
    acc = {m: float(np.mean(p == np.array(labels))) for m, p in preds.items()}
    assert got["val_images"] == len(labels) and all(got[f"val_acc_{m}"] == round(a, 4) for m, a in acc.items())
    assert got["mode"] == max(("both", "image", "text"), key=lambda m: (acc[m], -("both", "image", "text").index(m)))
    d = auto.decide(ev)
    assert np.array_equal(d.probs, ev[f"p_{got['mode']}"]) and d.info[0]["mode"] == got["mode"]
    # validation labels that agree with the text-only mode choose it
    assert not np.array_equal(preds["text"], preds["both"])
    assert auto.fit(Support([], examples(preds["text"]), 0, 0))["mode"] == "text"


def test_missing_checkpoint_names_the_command(memory) -> None:
    index, _, _ = memory
    with pytest.raises(XMError, match=r"no RECO checkpoint; train one with `xm train reco --index .* --encoder xm-tiny-vit:random`"):
        create("reco", _ctx(index))


def test_checkpoint_for_another_index_or_encoder_is_refused(memory, trained, tmp_path) -> None:
    index, _, _ = memory
    out, _ = trained
    other, _, _ = _build(tmp_path / "other", 777)
    with pytest.raises(XMError, match=r"reco\.json: RECO checkpoint trained on index \w+ .*not on this one") as e:
        create("reco", _ctx(other), checkpoint=str(out))
    assert "\n" not in str(e.value)
    # same index, other weights under the same name (a tampered fingerprint)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "reco.json").read_text())
    meta["probe"] = [p + 0.5 for p in meta["probe"]]
    (copy / "reco.json").write_text(json.dumps(meta))
    with pytest.raises(XMError, match="other weights of xm-tiny-vit:random"):
        create("reco", _ctx(index), checkpoint=str(copy))
    # weights that are not the ones the JSON names
    meta = json.loads((out / "reco.json").read_text())
    (copy / "reco.json").write_text(json.dumps(meta))
    shutil.copy(tmp_path / "other" / "idx" / "manifest.json", copy / "reco.safetensors")
    with pytest.raises(XMError, match="does not match the digest"):
        create("reco", _ctx(index), checkpoint=str(copy / "reco.json"))


def test_test_labels_never_reach_the_method(memory, trained, tmp_path) -> None:
    """The benchmark holds the test labels; shuffling them there leaves every RECO prediction
    unchanged (nothing the method is built or called with carries them) while the scores,
    computed from the same labels, do change: the shuffled labels did reach the run."""
    from xm.evaluation.datasets import load_dataset
    from xm.evaluation.decontaminate import Decontamination
    from xm.evaluation.runner import BenchmarkConfig, run_benchmark

    index, queries, labels = memory
    out, _ = trained
    for name in ("reco", "reco-mean"):
        for param in ("evidence", "decide"):
            opts = {"checkpoint": str(out)} if name == "reco" else {}
            assert "label" not in " ".join(inspect.signature(getattr(create(name, _ctx(index), **opts), param)).parameters)
    data = tmp_path / "data"
    for i, (image, y) in enumerate(zip(queries, labels)):
        (data / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        image.save(data / CLASSES[y] / f"q{i:03d}.png")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES))

    def run(ds, cache: str) -> dict:
        cfg = BenchmarkConfig(dataset="imagefolder", data_dir=data, index=index, model=TINY, methods=["reco", "reco-mean"],
                              templates=str(tmp_path / "templates.txt"), seeds=[0], options={"checkpoint": str(out)},
                              decontaminate=Decontamination(enabled=False), cache_dir=tmp_path / cache)
        return run_benchmark(cfg, ds, open_index(index))

    ds = load_dataset("imagefolder", data)
    a = run(ds, "c1")
    shuffled = [it.label for it in ds.items]
    random.Random(0).shuffle(shuffled)
    assert shuffled != [it.label for it in ds.items]
    for item, y in zip(ds.items, shuffled):
        item.label = y  # the test labels shuffled, images and their order unchanged; evidence recomputed
    b = run(ds, "c2")
    for name in ("reco", "reco-mean"):
        assert a["methods"][name]["predictions"] == b["methods"][name]["predictions"]
        assert a["methods"][name]["metrics"]["acc1"] != b["methods"][name]["metrics"]["acc1"]
