"""`xm benchmark --decontaminate`: planted near-duplicates of the test images are hidden from
every method's retrieval, every one of them and nothing else, by a per-run id filter over the
kNN search (`memories/filtered.py`), not a rebuild."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, TINY_ROLES, make_image
from xm.errors import XMError
from xm.evaluation.datasets import load_dataset
from xm.evaluation.decontaminate import Decontamination, decontaminate, find_near_duplicates
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.memories import open_index
from xm.memories.base import Memory
from xm.memories.filtered import FilteredMemory
from xm.methods.base import Context, Queries
from xm.methods.registry import create
from xm.pipeline import BuildConfig, build_index

CLASSES = ["red fox", "blue tram", "green parrot"]


class VectorMemory(Memory):
    """Image embeddings given by the test, searched exactly (numpy): controlled cosines."""

    kind = "vectors"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.count, self.root, self.searches = len(vectors), "vectors", 0

    id = "vectors"  # type: ignore[assignment]
    roles: Any = {"coarse": "ViT-B-32:openai"}
    encoders: Any = ["ViT-B-32:openai"]
    caption_hashes: Any = None

    def probe(self, spec): return None
    def default_model(self): return "ViT-B-32:openai"
    def describe(self): return {"kind": self.kind}
    def has_embeddings(self, spec, modality): return True
    def has_norms(self, spec, modality): return False
    def has_index(self, spec, modality): return True
    def check_encoder(self, encoder, role): return None
    def embeddings(self, spec, modality): raise NotImplementedError
    def norms(self, spec, modality): raise NotImplementedError
    def rows(self, ids, columns=None): return [{"id": int(i), "caption": f"c{i}", "url": None, "source_id": None} for i in ids]

    def search(self, modality, queries, k, encoder=None):
        self.searches += 1
        sims = np.asarray(queries, np.float32) @ self.vectors.T.astype(np.float32)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, order, 1), order.astype(np.int64)


def _planted(seed: int = 0, d: int = 64, n_test: int = 20) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Test vectors and a memory: near-duplicates of some test vectors (cosine 0.96-0.995; one
    test vector has 40 of them, more than a probe reads), hard negatives (0.85-0.94) and noise."""
    rng = np.random.default_rng(seed)
    tests = rng.standard_normal((n_test, d)).astype(np.float32)
    tests /= np.linalg.norm(tests, axis=1, keepdims=True)

    def at_cosine(v: np.ndarray, c: float) -> np.ndarray:
        u = rng.standard_normal(d)
        u -= (u @ v) * v
        return c * v + np.sqrt(1 - c * c) * u / np.linalg.norm(u)

    items, planted = [], set()
    for t in range(0, n_test, 3):
        for _ in range(40 if t == 0 else 2):
            planted.add(len(items))
            items.append(at_cosine(tests[t], rng.uniform(0.96, 0.995)))
        items.append(at_cosine(tests[t], rng.uniform(0.85, 0.94)))  # similar, not a near-duplicate
    items += list(rng.standard_normal((300, d)))
    order = rng.permutation(len(items))  # planted ids scattered over the memory
    where = {int(o): i for i, o in enumerate(order)}
    return tests, np.array(items, np.float32)[order], {where[i] for i in planted}


def test_cosine_finds_every_planted_near_duplicate_and_nothing_else() -> None:
    tests, vectors, planted = _planted()
    memory = VectorMemory(vectors)
    found = find_near_duplicates(memory, tests, None, "ViT-B-32:openai", Decontamination(threshold=0.95, probe_k=8))
    assert set(found.hidden.tolist()) == planted  # 40 near-duplicates of one image: the probe of 8 widened
    assert found.by_cosine == len(planted) and found.by_phash_only == 0


@pytest.mark.parametrize("k", [1, 5, 30, 200])
def test_filtered_search_is_the_full_ranking_without_the_hidden(k: int) -> None:
    tests, vectors, planted = _planted(1)
    inner = VectorMemory(vectors)
    filtered = FilteredMemory(inner, planted)
    sims, ids = filtered.search("image", tests, k)
    full_s, full_i = inner.search("image", tests, inner.count)
    for row in range(len(tests)):
        expect = [int(i) for i in full_i[row] if int(i) not in planted][:k]
        assert ids[row].tolist() == expect
        assert not planted & set(ids[row].tolist())
        np.testing.assert_allclose(sims[row], full_s[row][[int(i) not in planted for i in full_i[row]]][:k], rtol=1e-5)
    assert filtered.count == inner.count and filtered.items_id == "vectors" and filtered.id != inner.id
    assert FilteredMemory(inner, []).id == inner.id
    with pytest.raises(ValueError):
        FilteredMemory(inner, [inner.count])


@pytest.fixture(scope="module")
def planted_index(tmp_path_factory):
    """Test images in class folders; a memory built from a folder of unrelated images plus, for
    some test images, a byte copy and a PNG re-save (its images are at hand: the hash check)."""
    root = tmp_path_factory.mktemp("decontaminate")
    data, mdir = root / "data", root / "memory"
    mdir.mkdir()
    tests = []
    for i in range(12):
        folder = data / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        make_image(i).save(folder / f"t{i:02d}.jpg", quality=90)
        tests.append(folder / f"t{i:02d}.jpg")
    planted = []
    for i in (0, 4, 7, 11):
        shutil.copy(tests[i], mdir / f"copy{i:02d}.jpg")
        Image.open(tests[i]).convert("RGB").save(mdir / f"png{i:02d}.png")
        planted += [f"copy{i:02d}.jpg", f"png{i:02d}.png"]
    for j in range(40):
        make_image(7000 + j).save(mdir / f"z{j:02d}.jpg", quality=90)
    for f in mdir.iterdir():  # a copy is captioned with its test image's class: the leak decontamination stops
        label = int(f.stem[-2:]) % 3 if not f.stem.startswith("z") else int(f.stem[-2:]) % 2
        f.with_suffix(".txt").write_text(f"a photo of a {CLASSES[label]}." if not f.stem.startswith("z") else
                                         f"holiday snapshot {f.stem} of a {CLASSES[label]}")
    build_index(BuildConfig(source=str(mdir), out=root / "idx", **TINY_ROLES))
    memory = open_index(root / "idx")
    keys = {r["source_id"]: r["id"] for r in memory.rows(range(memory.count), columns=("id", "source_id"))}
    return root, data, memory, {keys[p] for p in planted}


def test_planted_copies_are_hidden_from_every_method(planted_index) -> None:
    root, data, memory, planted = planted_index
    ds = load_dataset("imagefolder", data)
    filtered, report = decontaminate(memory, Decontamination(), ds.items, "fp32", root / "cache")
    assert report["enabled"] and "more items" in report["why"]  # the default: 48 items > 12 test images
    assert set(report["hidden_ids"]) == planted and report["hidden"] == len(planted) == 8
    assert report["cosine"].startswith("skipped") and report["by_phash_only"] == 8 and report["phash_checked"] > 8
    assert isinstance(filtered, FilteredMemory)
    # the cache answers a rerun with the same ids
    assert decontaminate(memory, Decontamination(), ds.items, "fp32", root / "cache")[1] == report
    images = [it.image() for it in ds.items]
    ctx = Context(filtered, TINY, CLASSES, ["a photo of a {}."])
    before = create("xmore", Context(memory, TINY, CLASSES, ["a photo of a {}."]), k_coarse=16, k_fine=4, skip_short=False, retrieval="indirect")
    after = create("xmore", ctx, k_coarse=16, k_fine=4, skip_short=False, retrieval="indirect")
    reco = create("reco-mean", ctx, k=6)
    seen_before = set(before.evidence(Queries(images))["ids"].ravel().tolist())
    ev_x, ev_r = after.evidence(Queries(images)), reco.evidence(Queries(images))
    assert planted & seen_before  # unfiltered, X-MoRe does retrieve the copies
    assert not planted & set(ev_x["ids"].ravel().tolist())
    assert not planted & set(ev_r["neighbours"].ravel().tolist())


def test_the_benchmark_reports_and_applies_it(planted_index, tmp_path) -> None:
    root, data, memory, planted = planted_index
    ds = load_dataset("imagefolder", data)

    def run(setting: Decontamination) -> dict:
        cfg = BenchmarkConfig(dataset="imagefolder", data_dir=data, index=root / "idx", model=TINY, methods=["captions"], protocol="xm",
                              seeds=[0], options={"k_coarse": 4, "k_fine": 2, "skip_short": False, "retrieval": "indirect"},
                              decontaminate=setting, cache_dir=tmp_path)
        return run_benchmark(cfg, ds, memory)

    on, off = run(Decontamination()), run(Decontamination(enabled=False))
    assert on["decontamination"]["hidden"] == 8 and on["decontamination"]["enabled"]
    assert off["decontamination"] == {"enabled": False, "why": "--no-decontaminate"}
    assert on["index_manifest_id"] == off["index_manifest_id"] == memory.id
    # the copies' captions name their test image's class: without them the captions read fewer labels off the memory
    print(off["methods"]["captions"]["metrics"]["acc1"], on["methods"]["captions"]["metrics"]["acc1"])
    assert off["methods"]["captions"]["metrics"]["acc1"] > on["methods"]["captions"]["metrics"]["acc1"]
    small = load_dataset("imagefolder", data)
    small.items = small.items * 5  # a test set larger than the memory: off by default
    _, report = decontaminate(memory, Decontamination(), small.items, "fp32", tmp_path)
    assert not report["enabled"] and "no more items" in report["why"]
    with pytest.raises(XMError, match="decontaminate-threshold"):
        Decontamination(threshold=1.5)


# ------------------------------------------------- RECO's training tables and CODER's text sets

def _train(index, out, hidden=None, neighbours="exact"):
    from xm.training.reco import TrainConfig, train_reco

    return train_reco(TrainConfig(index=index, out=out, k=4, epochs=1, batch_size=16, dup_threshold=1.01,
                                  neighbours=neighbours, hidden=hidden))


@pytest.mark.parametrize("neighbours", ["exact", "index"])
def test_reco_training_hides_the_test_near_duplicates(planted_index, tmp_path, neighbours) -> None:
    """`--decontaminate-against`: the benchmark's finder, every planted copy out of both tables
    (no row holds one, their own rows empty) and out of the training pairs, nothing else."""
    import json

    from xm.evaluation.decontaminate import hidden_for_training

    root, data, memory, planted = planted_index
    ds = load_dataset("imagefolder", data)
    hidden = hidden_for_training(memory, None, [ds], Decontamination(enabled=True), "fp32", root / "cache")
    assert set(hidden.memory.tolist()) == planted == set(hidden.pairs.tolist())
    assert hidden.datasets[0]["dataset"] == "imagefolder" and hidden.datasets[0]["hidden"] == len(planted)
    summary = _train(root / "idx", tmp_path / "clean", hidden, neighbours)
    _train(root / "idx", tmp_path / "plain", None, neighbours)
    assert summary.pairs_hidden == summary.memory_hidden == len(planted) and summary.neighbours == neighbours
    ids = sorted(planted)
    for m in ("image", "text"):
        clean, full = np.load(tmp_path / "clean" / f"neighbours-{m}.npy"), np.load(tmp_path / "plain" / f"neighbours-{m}.npy")
        assert np.isin(full, ids).any()  # without it, the copies are neighbours
        assert not np.isin(clean, ids).any() and (clean[ids] == -1).all()
        keep = np.setdiff1d(np.arange(memory.count), ids)
        for r in keep:  # every other row: the same ranking with the copies taken out
            expect = [i for i in full[r] if i not in planted]
            assert clean[r][: len(expect)].tolist() == expect
    meta = json.loads((tmp_path / "clean" / "reco.json").read_text())
    assert meta["pairs_trained"] == memory.count - len(planted)
    assert meta["decontamination"]["memory_ids"] == ids and meta["decontamination"]["datasets"][0]["dataset"] == "imagefolder"
    assert meta["neighbours"]["search"] == neighbours
    assert meta["train_key"]["hidden"] == hidden.digest()


def test_benchmark_says_whether_recos_checkpoint_was_decontaminated(planted_index, tmp_path) -> None:
    from xm.evaluation.decontaminate import hidden_for_training

    root, data, memory, planted = planted_index
    ds = load_dataset("imagefolder", data)
    hidden = hidden_for_training(memory, None, [ds], Decontamination(enabled=True), "fp32", root / "cache")
    _train(root / "idx", tmp_path / "clean", hidden)
    _train(root / "idx", tmp_path / "plain")

    def run(checkpoint: str, setting: Decontamination | None = None) -> dict:
        cfg = BenchmarkConfig(dataset="imagefolder", data_dir=data, index=root / "idx", model=TINY, methods=["reco"], protocol="xm",
                              seeds=[0], options={"checkpoint": checkpoint, "k": 4}, decontaminate=setting or Decontamination(),
                              cache_dir=tmp_path / "c")
        return run_benchmark(cfg, ds, memory)["methods"]["reco"]["decontamination"]

    clean, plain = run(str(tmp_path / "clean")), run(str(tmp_path / "plain"))
    assert clean["run_hidden"] == 8 and clean["run_hidden_in_training"] == 0 and "warning" not in clean
    assert clean["checkpoint_against"] == ["imagefolder"] and clean["dataset_named"]
    assert "all 8 near-duplicates" in clean["line"]
    assert plain["run_hidden_in_training"] == 8 and "optimistic" in plain["warning"] and "not decontaminated" in plain["line"]
    off = run(str(tmp_path / "plain"), Decontamination(enabled=False))
    assert off["run_hidden"] == 0 and "warning" not in off


def test_cli_train_reco_decontaminate_against(planted_index, tmp_path) -> None:
    from typer.testing import CliRunner

    from xm.cli.app import _register, app

    _register()
    root, data, memory, planted = planted_index
    args = ["train", "reco", "--index", str(root / "idx"), "--out", str(tmp_path / "ck"), "--k", "3", "--epochs", "1",
            "--dup-threshold", "1.01", "--device", "cpu", "--cache-dir", str(root / "cache")]
    r = CliRunner().invoke(app, args + ["--decontaminate-against", f"imagefolder={data}", "--neighbours", "exact"])
    assert r.exit_code == 0, r.output
    assert "8 memory item(s) out of the tables, 8 training pair(s) left out" in r.output
    assert "exact kNN on the device" in r.output
    bad = CliRunner().invoke(app, args + ["--neighbours", "flat"])
    assert isinstance(bad.exception, XMError) and str(bad.exception) == "--neighbours 'flat': choose from auto, exact, index"
    missing = CliRunner().invoke(app, args + ["--decontaminate-against", f"imagefolder={tmp_path / 'nowhere'}"])
    assert isinstance(missing.exception, XMError) and "no such data folder" in str(missing.exception)


def test_coder_memory_captions_of_hidden_items_are_dropped(planted_index, tmp_path) -> None:
    """CODER's `memory` texts: mined in the run through the filtered memory, hidden items are
    never searched; a text set `xm texts` mined before, through the whole memory, loses them."""
    from xm.encoders import load_encoder
    from xm.texts import TextOptions, build_textset

    root, data, memory, planted = planted_index
    ds = load_dataset("imagefolder", data)
    filtered, report = decontaminate(memory, Decontamination(), ds.items, "fp32", root / "cache")
    opts = TextOptions(sources="names,memory", memory_k=48, memory_search=48, max_similarity=1.0)
    before = build_textset(CLASSES, load_encoder(TINY), opts, memory)
    mined = {int(t.extra["id"]) for t in before.of_source("memory")}
    assert planted & mined  # mined through the whole memory, copies' captions are among them
    before.write(tmp_path / "texts.json")
    ctx = Context(filtered, TINY, CLASSES, ["a photo of a {}."])
    from_file = create("coder", ctx, texts_file=str(tmp_path / "texts.json"))
    kept = {int(t.extra["id"]) for t in from_file.textset.of_source("memory")}
    assert kept == mined - planted  # every hidden one dropped, nothing else
    said = from_file.decontamination()
    assert said["dropped"] == len(planted & mined) and "warning" not in said
    in_run = create("coder", ctx, sources="names,memory", memory_k=48, memory_search=48, max_similarity=1.0)
    assert not planted & {int(t.extra["id"]) for t in in_run.textset.of_source("memory")}
    assert "never searched" in in_run.decontamination()["line"]
    # a set mined from another index cannot be checked: said, and warned
    other = before.to_json()
    other["memory"]["index_id"] = "another-index"
    (tmp_path / "other.json").write_text(__import__("json").dumps(other))
    warned = create("coder", ctx, texts_file=str(tmp_path / "other.json")).decontamination()
    assert "cannot be checked" in warned["line"] and "optimistic" in warned["warning"]


def test_checkpoints_trained_before_these_options_stay_valid(planted_index, tmp_path) -> None:
    """A checkpoint whose key predates `--neighbours` and decontamination (index tables, nothing
    hidden) is still the finished run of the same settings; exact tables are other settings."""
    import json

    root, data, memory, planted = planted_index
    _train(root / "idx", tmp_path / "old", None, "index")
    meta_file = tmp_path / "old" / "reco.json"
    meta = json.loads(meta_file.read_text())
    del meta["train_key"]["neighbours"], meta["train_key"]["hidden"]
    meta_file.write_text(json.dumps(meta))
    assert _train(root / "idx", tmp_path / "old", None, "auto").already_done  # auto on the CPU: the index
    with pytest.raises(XMError, match=r"neighbours='index' \(now 'exact'\)"):
        _train(root / "idx", tmp_path / "old", None, "exact")
