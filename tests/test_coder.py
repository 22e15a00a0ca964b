"""CODER (zero-shot, two-stage rerank, Adapter), Tip-Adapter, the text sources and `xm texts`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, TINY_ROLES, make_image, near_duplicate
from xm.errors import XMError
from xm.methods.base import Context, Example, Queries, Support
from xm.methods.registry import create, get
from xm.texts import Text, TextOptions, TextSet, build_textset, read_descriptions, read_textset
from xm.texts.wordnet import WordNet, find_wordnet

# ------------------------------------------------------------------ a hand-made encoder

class FakeEncoder:
    """Texts and "images" mapped to given unit vectors, so scores can be computed by hand."""

    def __init__(self, texts: dict[str, list[float]]) -> None:
        self.spec = f"fake:{uuid.uuid4().hex[:8]}"
        self.vec = {t: self._unit(v) for t, v in texts.items()}
        self.dim = len(next(iter(texts.values())))
        self.logit_scale = 100.0

    @staticmethod
    def _unit(v) -> np.ndarray:
        v = np.asarray(v, np.float64)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def encode_texts(self, texts):
        return np.stack([self.vec[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images, batch_size: int = 64):
        return np.stack([self._unit(im) for im in images])

    # the Encoder interface `Queries` uses: "pixels" are the image vectors themselves
    def preprocess(self, image):
        import torch

        return torch.tensor(np.asarray(image, np.float32))

    def encode_pixels(self, pixels):
        return np.stack([self._unit(p.numpy()) for p in pixels])


class FakeContext(Context):
    def __init__(self, encoder, classnames, dataset=None) -> None:
        super().__init__(None, str(encoder.spec), classnames, ["{}"], dataset=dataset)
        self.fake = encoder

    def encoder(self, spec):
        return self.fake


def _write_set(path: Path, classes: list[str], texts: dict[str, list[Text]]) -> Path:
    return TextSet(classes, texts).write(path)


def _cos(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


HAND = {  # 3-d vectors: two classes, names, a synonym, attributes, an analogous text
    "a photo of cat": [1, 0.2, 0], "a photo of kitty": [0.9, 0, 0.4], "cat which has whiskers": [0.7, 0.7, 0.1],
    "cat which has fur": [0.3, 0.2, 0.9], "a photo of dog": [0, 1, 0.1], "a dog similar to wolf.": [0.2, 0.8, 0.5],
}


def _hand_set(tmp_path: Path) -> Path:
    return _write_set(tmp_path / "hand.json", ["cat", "dog"], {
        "cat": [Text("a photo of cat", "name", "names"), Text("a photo of kitty", "synonym", "wordnet"),
                Text("cat which has whiskers", "attribute", "descriptions"), Text("cat which has fur", "attribute", "descriptions")],
        "dog": [Text("a photo of dog", "name", "names"), Text("a dog similar to wolf.", "analogous", "descriptions")],
    })


def test_zero_shot_score_against_hand_computation(tmp_path) -> None:
    enc = FakeEncoder(HAND)
    m = create("coder", FakeContext(enc, ["cat", "dog"]), texts_file=str(_hand_set(tmp_path)))
    x = [0.5, 0.5, 0.5]
    ev = m.evidence(Queries([x, [0.1, 1, 0]]))
    # class cat: mean(whiskers, fur, max(name, synonym)); dog: mean(analogous, name)
    cat = 100 * (_cos(x, HAND["cat which has whiskers"]) + _cos(x, HAND["cat which has fur"])
                 + max(_cos(x, HAND["a photo of cat"]), _cos(x, HAND["a photo of kitty"]))) / 3
    dog = 100 * (_cos(x, HAND["a dog similar to wolf."]) + _cos(x, HAND["a photo of dog"])) / 2
    assert np.allclose(ev["scores"][0], [cat, dog], atol=1e-4)
    d = m.decide(ev)
    e = np.exp(np.array([cat, dog]) - max(cat, dog))
    assert np.allclose(d.probs[0], e / e.sum(), atol=1e-5)
    assert np.argmax(d.probs[1]) == 1 and len(d.info) == 2
    why = m.explain(ev, 0)
    assert why["candidates"][0]["class"] == ("cat" if cat > dog else "dog") and why["texts"] == 6


def test_explanation_table_names_each_candidate_once_beside_its_closest_texts(tmp_path) -> None:
    """`xm classify --explain`'s table: per stage-1 candidate (best first), its texts by cosine
    to the image (at most 5), the class and its score on the first text's row only."""
    enc = FakeEncoder(HAND)
    m = create("coder", FakeContext(enc, ["cat", "dog"]), texts_file=str(_hand_set(tmp_path)))
    x = [0.5, 0.5, 0.5]
    ev = m.evidence(Queries([x]))
    [table] = m.explanation_view(m.explain(ev, 0))
    own = {"cat": ["a photo of cat", "a photo of kitty", "cat which has whiskers", "cat which has fur"],
           "dog": ["a photo of dog", "a dog similar to wolf."]}
    kind = {"a photo of cat": ("name", "names"), "a photo of kitty": ("synonym", "wordnet"),
            "cat which has whiskers": ("attribute", "descriptions"), "cat which has fur": ("attribute", "descriptions"),
            "a photo of dog": ("name", "names"), "a dog similar to wolf.": ("analogous", "descriptions")}
    scores = dict(zip(["cat", "dog"], ev["scores"][0]))
    expected = []
    for c in sorted(scores, key=lambda c: -scores[c]):
        for j, t in enumerate(sorted(own[c], key=lambda t: -_cos(x, HAND[t]))):
            expected.append((c if j == 0 else "", scores[c] if j == 0 else None, _cos(x, HAND[t]), *kind[t], t))
    assert [r[:2] + r[3:] for r in table.rows] == [r[:2] + r[3:] for r in expected]
    assert np.allclose([r[2] for r in table.rows], [r[2] for r in expected], atol=1e-5)
    assert table.title == "candidates, closest texts (6 texts, 0 one-vs-one)"


def test_rerank_against_hand_computation(tmp_path) -> None:
    """p1 - p2 under the threshold: the top candidates reordered by one-vs-one texts."""
    vec = {"a photo of a": [1, 0, 0, 0], "a photo of b": [0.98, 0.2, 0, 0], "a photo of c": [0, 0, 1, 0],
           "a not b": [0, 0, 0, 1], "b not a": [0, 1, 0, 0], "a not c": [0, 0, 1, 0], "c not a": [0, 0, 0, 1]}
    enc = FakeEncoder(vec)
    texts = {"a": [Text("a photo of a", "name", "names"), Text("a not b", "ovo", "descriptions", "b"),
                   Text("a not c", "ovo", "descriptions", "c")],
             "b": [Text("a photo of b", "name", "names"), Text("b not a", "ovo", "descriptions", "a")],
             "c": [Text("a photo of c", "name", "names"), Text("c not a", "ovo", "descriptions", "a")]}
    path = _write_set(tmp_path / "ovo.json", ["a", "b", "c"], texts)
    x = [1.0, 0.05, 0.0, 0.02]  # closest to a's name, but b's difference text wins the rerank
    ctx = FakeContext(enc, ["a", "b", "c"])
    plain = create("coder", ctx, texts_file=str(path))
    rr = create("coder-rerank", ctx, texts_file=str(path), threshold=0.999, rerank_top=3)
    ev = plain.evidence(Queries([x]))
    assert list(ev["top"][0]) == [0, 1, 2]
    # hand: r_a = mean over b, c of [cos(a not b) - cos(b not a)], [cos(a not c) - cos(c not a)]
    r_a = ((_cos(x, vec["a not b"]) - _cos(x, vec["b not a"])) + (_cos(x, vec["a not c"]) - _cos(x, vec["c not a"]))) / 2
    r_b = ((_cos(x, vec["b not a"]) - _cos(x, vec["a not b"])) + 0.0) / 2  # no b-c texts: that pair adds 0
    r_c = ((_cos(x, vec["c not a"]) - _cos(x, vec["a not c"])) + 0.0) / 2
    assert np.allclose(ev["rerank"][0], [r_a, r_b, r_c], atol=1e-5)
    assert r_b > max(r_a, r_c)
    p1, p2 = plain.decide(ev).probs[0], rr.decide(ev)
    assert np.argmax(p1) == 0 and np.argmax(p2.probs[0]) == 1 and p2.info[0]["reranked"]
    # the stage-1 probabilities, handed out in rerank order
    assert np.allclose(sorted(p2.probs[0]), sorted(p1)) and np.isclose(p2.probs[0][1], p1.max())
    # above the threshold nothing moves
    assert np.allclose(create("coder-rerank", ctx, texts_file=str(path), threshold=0.0).decide(ev).probs, p1[None])


def test_one_class_is_certain(tmp_path) -> None:
    """A single class (the API takes any list of names): probability 1, margin 1 (no runner-up)."""
    path = _write_set(tmp_path / "one.json", ["cat"], {"cat": [Text("a photo of cat", "name", "names")]})
    m = create("coder", FakeContext(FakeEncoder(HAND), ["cat"]), texts_file=str(path))
    d = m.decide(m.evidence(Queries([[0.5, 0.5, 0.5], [0, 1, 0]])))
    assert d.probs.tolist() == [[1.0], [1.0]] and [i["margin"] for i in d.info] == [1.0, 1.0]


def test_rerank_threshold_table_and_flag(tmp_path) -> None:
    path = _hand_set(tmp_path)
    enc = FakeEncoder({**HAND, "cat unlike dog": [1, 0, 0], "dog unlike cat": [0, 1, 0]})
    data = json.loads(path.read_text())
    data["texts"]["cat"].append({"text": "cat unlike dog", "kind": "ovo", "source": "file", "versus": "dog"})
    data["texts"]["dog"].append({"text": "dog unlike cat", "kind": "ovo", "source": "file", "versus": "cat"})
    path.write_text(json.dumps(data))
    with pytest.raises(XMError, match="threshold=T"):
        create("coder-rerank", FakeContext(enc, ["cat", "dog"]), texts_file=str(path))
    assert create("coder-rerank", FakeContext(enc, ["cat", "dog"], "eurosat"), texts_file=str(path)).threshold == 0.3
    assert create("coder-rerank", FakeContext(enc, ["cat", "dog"], "imagenetv2"), texts_file=str(path)).threshold == 0.05
    with pytest.raises(XMError, match="no one-vs-one"):
        create("coder-rerank", FakeContext(enc, ["cat", "dog"], "eurosat"), texts_file=str(_hand_set(tmp_path)))


# ------------------------------------------------------------------ labelled synthetic images

CLASSES = ["red fox", "blue tram", "green parrot", "stone bridge"]


def _examples(n_per_class: int, offset: int, tag: str) -> list[Example]:
    """Near-duplicates of one base image per class: features cluster by class under any encoder."""
    out = []
    for y in range(len(CLASSES)):
        base = make_image(y, size=64)
        for i in range(n_per_class):
            s = offset + 97 * y + i
            out.append(Example(load=lambda b=base, s=s: near_duplicate(b, s), label=y, key=f"{tag}/{y}/{i}"))
    return out


@pytest.fixture(scope="module")
def splits():
    train, val, test = _examples(4, 0, "train"), _examples(4, 5000, "val"), _examples(6, 9000, "test")
    return train, val, test


def _ctx(dataset=None) -> Context:
    return Context(None, TINY, CLASSES, ["a photo of a {}."], dataset=dataset)


def _predict(method, examples) -> np.ndarray:
    q = Queries([e.load() for e in examples])
    return np.argmax(method.decide(method.evidence(q)).probs, axis=1)


def _on_disk(root: Path, train, val, test, test_labels: list[int] | None = None) -> tuple[Path, Path]:
    """The splits' images under `root` and a CoOp split file naming them, with `test_labels`
    in place of the test split's own where given (the benchmark reads labels from there)."""
    rows: dict[str, list] = {}
    for split, examples in (("train", train), ("val", val), ("test", test)):
        rows[split] = []
        for j, e in enumerate(examples):
            rel = f"{e.key}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (root / rel).is_file():
                e.load().save(root / rel)
            y = test_labels[j] if split == "test" and test_labels is not None else e.label
            rows[split].append([rel, int(y), CLASSES[int(y)]])
    split_file = root / f"split-{uuid.uuid4().hex[:8]}.json"
    split_file.write_text(json.dumps(rows))
    return root, split_file


def _bench(root: Path, split_file: Path, methods: list[str], cache: Path, **options) -> dict:
    from xm.evaluation.datasets import load_dataset
    from xm.evaluation.runner import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(dataset="imagefolder", data_dir=root, index=None, model=TINY, methods=methods, seeds=[1],
                          split_file=split_file, shots=[4], val_per_class=4, options=options, cache_dir=cache)
    return run_benchmark(cfg, load_dataset("imagefolder", root, "test", split_file), None)


def test_coder_predictions_ignore_test_labels(splits, tmp_path) -> None:
    """The benchmark holds the test labels; relabelled there, they leave every prediction of
    coder and coder-rerank unchanged while the scores from the same labels change (so the
    new labels did reach the run). With random weights coder is at chance, and a shuffle of
    balanced labels can keep its accuracy: the relabelling is its own first predictions,
    under which the same predictions score 100%."""
    train, val, test = splits
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"differences": {a: {b: [f"{a} rather than {b}"] for b in CLASSES if b != a} for a in CLASSES}}))
    opts = {"threshold": 1.0, "descriptions": str(desc)}
    a = _bench(*_on_disk(tmp_path / "d", train, val, test), ["coder", "coder-rerank"], tmp_path / "c1", **opts)
    relabelled = a["methods"]["coder"]["predictions"]
    assert relabelled != [e.label for e in test] and a["methods"]["coder"]["metrics"]["acc1"] < 1.0
    b = _bench(*_on_disk(tmp_path / "d", train, val, test, relabelled), ["coder", "coder-rerank"], tmp_path / "c2", **opts)
    for m in ("coder", "coder-rerank"):
        assert a["methods"][m]["predictions"] == b["methods"][m]["predictions"]
    assert b["methods"]["coder"]["metrics"]["acc1"] == 1.0
    reranked = create("coder-rerank", _ctx(), threshold=1.0, descriptions=str(desc))
    assert all(i["reranked"] for i in reranked.decide(reranked.evidence(Queries([e.load() for e in test]))).info)


def _fit(name: str, train, val, test, **kw) -> tuple[dict, np.ndarray]:
    m = create(name, _ctx(), augment_passes=0, grid=8, search_rounds=2, **kw)
    chosen = m.fit(Support(train=train, val=val, shots=4, seed=1))
    return chosen, _predict(m, test)


@pytest.mark.parametrize("name", ["coder-adapter", "tip-adapter"])
def test_adapter_search_ignores_the_test_split(splits, name, tmp_path) -> None:
    """alpha and beta come from the validation split: poisoning the test labels changes
    nothing, poisoning the validation labels changes the choice."""
    train, val, test = splits
    chosen, pred = _fit(name, train, val, test)
    assert chosen["selected_on"] == "validation" and chosen["val_images"] == len(val) and chosen["shots"] == 4
    # poisoned test labels, through the benchmark that holds them: the same fit and predictions,
    # other scores (the poisoned labels did reach the run)
    opts = {"augment_passes": 0, "grid": 8, "search_rounds": 2}
    clean = _bench(*_on_disk(tmp_path / "d", train, val, test), [name], tmp_path / "c1", **opts)[
        "methods"][f"{name}@4"]
    poisoned = _bench(*_on_disk(tmp_path / "d", train, val, test, [(e.label + 1) % len(CLASSES) for e in test]), [name],
                      tmp_path / "c2", **opts)["methods"][f"{name}@4"]

    def fitted(r: dict) -> list[dict]:
        return [{k: v for k, v in f.items() if "seconds" not in k} for f in r["fit"]]

    assert fitted(clean) == fitted(poisoned) and clean["predictions"] == poisoned["predictions"]
    assert clean["metrics"]["acc1"] != poisoned["metrics"]["acc1"]
    poisoned_val = [Example(e.load, (e.label + 1) % len(CLASSES), e.key) for e in val]
    chosen3, _ = _fit(name, train, poisoned_val, test)
    assert (chosen3["alpha"], chosen3["beta"], chosen3["val_accuracy"]) != (chosen["alpha"], chosen["beta"], chosen["val_accuracy"])
    # the adapter learns the support set: far above zero-shot CLIP with random weights
    acc = float(np.mean(pred == [e.label for e in test]))
    clip = create("clip", _ctx())
    clip_acc = float(np.mean(_predict(clip, test) == [e.label for e in test]))
    # measured: clip 0.25 (chance), coder-adapter 0.75, tip-adapter 0.92
    assert acc >= clip_acc + 0.4, (acc, clip_acc)


def test_support_augmentation_is_seeded(splits) -> None:
    from xm.methods import tip_adapter
    from xm.methods.tip_adapter import support_features

    train = splits[0][:3]
    enc = _ctx().encoder(TINY)
    a, b = support_features(enc, train, 2, seed=5), support_features(enc, list(train), 2, seed=6)
    tip_adapter._FEATURES.clear()  # computed again, not read from the shared cache
    again = support_features(enc, train, 2, seed=5)
    plain = support_features(enc, train, 0, seed=5)
    assert np.allclose(a, again) and not np.allclose(a, b) and not np.allclose(a, plain)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(plain, enc.encode_images([e.load() for e in train]), atol=1e-5)
    # the mean of augmented views stays near the plain view (crops of the same image), batching changes nothing
    assert (np.sum(a * plain, axis=1) > 0.9).all()
    tip_adapter._FEATURES.clear()
    assert np.allclose(support_features(enc, train, 2, seed=5, batch_size=2), a, atol=1e-5)


def test_fit_reports_the_feature_seconds_recorded_with_the_features(splits) -> None:
    """Features are computed once per (encoder, images, passes, seed) and shared: a fit reports
    what computing them cost when they were computed, a second fit the same figures."""
    from xm.methods import tip_adapter

    train, val, _ = splits
    m = create("tip-adapter", _ctx(), augment_passes=0, grid=3, search_rounds=1)
    first = m.fit(Support(train=train, val=val, shots=4, seed=1))
    spec = str(m.encoder.spec)
    recorded = tip_adapter._FEATURE_SECONDS
    assert first["val_feature_seconds"] == round(recorded[(spec, tuple(e.key for e in val), 0, 0)], 3)
    assert first["support_feature_seconds"] == round(recorded[(spec, tuple(e.key for e in train), 0, 1)], 3)
    again = m.fit(Support(train=train, val=val, shots=4, seed=1))
    assert (again["val_feature_seconds"], again["support_feature_seconds"]) == (first["val_feature_seconds"],
                                                                              first["support_feature_seconds"])


def test_adapter_needs_fit_and_keys_its_state(splits) -> None:
    train, val, test = splits
    m = create("coder-adapter", _ctx(), augment_passes=1, grid=3, search_rounds=1)
    with pytest.raises(XMError, match="few-shot"):
        m.evidence(Queries([test[0].load()]))
    before = m.evidence_key()
    m.fit(Support(train=train[::2], val=[], shots=2, seed=3))
    assert m.state["alpha"] == 1.73 and m.state["beta"] == 91.34  # no validation set: the start values
    k1 = m.evidence_key()
    m.fit(Support(train=train, val=[], shots=4, seed=3))
    assert len({before, k1, m.evidence_key()}) == 3
    assert get("coder-adapter").method.few_shot and get("tip-adapter").method.few_shot and not get("coder").method.few_shot


def test_a_search_range_may_be_one_point_and_a_reversed_one_is_refused(splits) -> None:
    """alpha_min = alpha_max fixes α (the grid is that one point); a low end above the high end
    is refused in one line."""
    train, val, _ = splits
    m = create("tip-adapter", _ctx(), augment_passes=0, grid=3, search_rounds=2, alpha_min=2.5, alpha_max=2.5)
    chosen = m.fit(Support(train=train, val=val, shots=4, seed=1))
    assert chosen["alpha"] == 2.5 and chosen["evaluations"] == 1 + 2 * 3
    with pytest.raises(XMError, match=r"tip-adapter: a search range's low end exceeds its high end \(alpha 2.5..2.4"):
        create("tip-adapter", _ctx(), alpha_min=2.5, alpha_max=2.4)


# ------------------------------------------------------------------ text sources

def test_descriptions_dclip_and_sectioned(tmp_path) -> None:
    flat = tmp_path / "dclip.json"
    flat.write_text(json.dumps({"Red_Fox": ["a bushy tail", "orange fur"], "Blue Tram": ["rails"], "unicorn": ["a horn"],
                                "GreenParrot": ["green wings"], "STONE bridge": ["arches"]}))
    d = read_descriptions(flat, CLASSES)
    assert d.descriptors == {"red fox": ["a bushy tail", "orange fur"], "blue tram": ["rails"], "green parrot": ["green wings"],
                             "stone bridge": ["arches"]} and d.unmatched == ["unicorn"]
    sec = tmp_path / "sections.json"
    sec.write_text(json.dumps({"descriptors": {"red fox": ["a bushy tail"], "green parrot": ["wings"], "stone bridge": ["arches"]},
                               "analogous": {"red fox": ["arctic fox", "Blue_Tram"]},
                               "differences": {"red fox": {"blue tram": ["fur instead of metal"]}}}))
    enc = _ctx().encoder(TINY)
    ts = build_textset(CLASSES, enc, TextOptions(descriptions=str(sec), max_similarity=1.0))
    fox = {t.kind: t for t in ts.of("red fox")}
    assert fox["name"].text == "a photo of red fox" and fox["attribute"].text == "red fox which has a bushy tail"
    assert fox["attribute"].source == "descriptions" and fox["analogous"].text == "a red fox similar to arctic fox."
    # one-vs-one attributes rendered through every one-vs-one template (the authors' default list has 7)
    ovo = ts.of("red fox", ("ovo",))
    assert len(ovo) == 7 and {t.versus for t in ovo} == {"blue tram"}
    assert ovo[0].text == "Because of fur instead of metal, red fox is different from blue tram."
    as_written = build_textset(CLASSES, enc, TextOptions(descriptions=str(sec), max_similarity=1.0, ovo_as_written=True))
    assert [t.text for t in as_written.of("red fox", ("ovo",))] == ["fur instead of metal"]
    assert [x["analogous"] for x in ts.dropped] == ["Blue_Tram"]  # another class of the label set
    strict = build_textset(CLASSES, enc, TextOptions(descriptions=str(sec), max_similarity=-1.0))
    assert not strict.of("red fox", ("analogous",)) and len(strict.dropped) == 2
    assert build_textset(CLASSES, enc, TextOptions(dataset="eurosat")).of("red fox")[0].text == \
        "a photo of red fox, satellite domain."
    bad = tmp_path / "mixed.json"
    bad.write_text(json.dumps({"red fox": ["x"], "analogous": {"red fox": ["y"]}}))
    with pytest.raises(XMError, match="mixes lists and objects"):
        read_descriptions(bad, CLASSES)
    with pytest.raises(XMError, match="needs a descriptions file"):
        TextOptions(sources="names,descriptions").source_list()


def _write_wndb(folder: Path, synsets: list[tuple[str, list[str]]]) -> Path:
    """A tiny WordNet database (index.noun, data.noun) in the WNDB format, byte offsets and all."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
    data, offsets, pos = [header], [], len(header.encode())
    for i, (_, words) in enumerate(synsets):
        body = " ".join(f"{w} 0" for w in words)
        line = f"{pos:08d} 06 n {len(words):02x} {body} 000 | gloss {i}  \n"
        offsets.append(pos)
        data.append(line)
        pos += len(line.encode())
    (folder / "data.noun").write_text("".join(data))
    lemma_offsets: dict[str, list[int]] = {}
    for off, (_, words) in zip(offsets, synsets):
        for w in words:
            lemma_offsets.setdefault(w.lower(), []).append(off)
    lines = [header] + [f"{lemma} n {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
                        for lemma, offs in sorted(lemma_offsets.items())]
    (folder / "index.noun").write_text("".join(lines))
    return folder


def test_wordnet_synonyms_from_a_fixture(tmp_path, monkeypatch) -> None:
    wn_dir = _write_wndb(tmp_path / "wn", [("tram", ["tram", "tramcar", "trolley", "streetcar"]),
                                           ("tram2", ["tram", "tramway"]), ("fox", ["fox", "Vulpes_vulpes"])])
    wn = WordNet(wn_dir)
    assert wn.lemmas("tram") == ["tramcar", "trolley", "streetcar", "tramway"]
    assert wn.lemmas("fox or tram")[:2] == ["Vulpes vulpes", "tramcar"] and wn.lemmas("unicorn") == []
    enc = _ctx().encoder(TINY)
    ts = build_textset(["tram", "fox", "parrot"], enc,
                       TextOptions(sources="names,wordnet", wordnet_dir=str(wn_dir), synonym_min_sim=-1.0))
    syn = [t for c in ts.classes for t in ts.of(c, ("synonym",))]
    assert all(t.source == "wordnet" and t.text == f"a photo of {t.extra['lemma']}" for t in syn)
    assert len(syn) + len([d for d in ts.dropped if d["source"] == "wordnet"]) == 5  # each lemma kept or dropped, with why
    assert ts.meta["wordnet"] == str(wn_dir)
    with pytest.raises(XMError, match="no WordNet index.noun"):
        find_wordnet(str(tmp_path))
    import xm.texts.wordnet as w

    monkeypatch.delenv("XM_WORDNET_DIR", raising=False)
    monkeypatch.setattr(w, "DEFAULT_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(XMError, match="install Debian's wordnet-base"):
        build_textset(["tram", "fox"], enc, TextOptions(sources="names,wordnet"))


@pytest.fixture(scope="module")
def mined_index(tmp_path_factory):
    """A memory whose captions talk about the classes, and unrelated ones."""
    from xm.pipeline import BuildConfig, build_index

    root = tmp_path_factory.mktemp("coder_memory")
    src = root / "src"
    src.mkdir()
    caps = [f"{c} {w}" for c in CLASSES for w in ("at dawn", "close up", "in the city", "a photo")]
    caps += [f"holiday snapshot {i}" for i in range(12)]
    for i, cap in enumerate(caps):
        make_image(300 + i, size=64).save(src / f"m{i:03d}.jpg")
        (src / f"m{i:03d}.txt").write_text(cap)
    build_index(BuildConfig(source=str(src), out=root / "idx", **TINY_ROLES))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def test_memory_mining(mined_index) -> None:
    from xm.memories import open_index

    memory = open_index(mined_index / "idx")
    enc = _ctx().encoder(TINY)
    ts = build_textset(CLASSES, enc, TextOptions(sources="names,memory", memory_k=3, memory_search=10, max_similarity=1.0),
                       memory)
    mined = {c: ts.of(c, ("caption",)) for c in CLASSES}
    assert any(mined.values())
    names = enc.encode_texts([f"a photo of {c}" for c in CLASSES])
    all_caps = set(memory.store.captions(range(memory.count)))
    for i, c in enumerate(CLASSES):
        assert len(mined[c]) <= 3
        for t in mined[c]:
            assert t.source == "memory" and t.text in all_caps and memory.store.captions([t.extra["id"]])[0] == t.text
            sims = enc.encode_texts([t.text])[0] @ names.T
            assert np.argmax(sims) == i  # closer to its own class than to every other
    assert all(d["source"] == "memory" and "reason" in d for d in ts.dropped)
    # CODER mines the same way inside the method; without an index it says so in one line
    m = create("coder", Context(memory, TINY, CLASSES, ["a photo of a {}."]), sources="names,memory", memory_k=3,
               memory_search=10, max_similarity=1.0)
    assert m.textset.digest() == ts.digest()
    with pytest.raises(XMError, match="needs an index"):
        create("coder", _ctx(), sources="names,memory")


def test_texts_cli_round_trip(mined_index, tmp_path) -> None:
    from typer.testing import CliRunner

    from xm.cli.app import _register, app

    _register()
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"descriptors": {c: [f"feature {j} of {c}" for j in range(3)] for c in CLASSES},
                                "differences": {CLASSES[0]: {CLASSES[1]: ["a tail, no rails"]},
                                                CLASSES[1]: {CLASSES[0]: ["rails, no tail"]}}}))
    out = tmp_path / "texts.json"
    r = CliRunner().invoke(app, ["texts", "--labels", str(mined_index / "classes.txt"), "--index", str(mined_index / "idx"),
                                 "--out", str(out), "--descriptions", str(desc), "--sources", "names,descriptions,memory",
                                 "--max-similarity", "1", "--memory-k", "2", "--memory-search", "8", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["by_source"]["descriptions"] == {"attribute": 12, "ovo": 14}  # 2 attributes x 7 templates and summary["by_source"]["names"]["name"] == 4
    data = json.loads(out.read_text())
    assert data["format"] == "xm-texts/1" and data["classes"] == CLASSES and data["counts"]["vector"] == summary["vector_texts"]
    ts = read_textset(out)
    assert ts.to_json() == data  # read back exactly as written
    from xm.memories import open_index

    ctx = Context(open_index(mined_index / "idx"), TINY, CLASSES, ["a photo of a {}."])
    from_file = create("coder", ctx, texts_file=str(out))
    direct = create("coder", ctx, descriptions=str(desc), sources="names,descriptions,memory", max_similarity=1.0,
                    memory_k=2, memory_search=8)
    images = Queries([make_image(i, size=64) for i in range(5)])
    assert np.allclose(from_file.evidence(images)["scores"], direct.evidence(images)["scores"])
    # an edited file is another text set (and another cache key)
    data["texts"][CLASSES[0]] = [t for t in data["texts"][CLASSES[0]] if t["kind"] != "attribute"]
    out.write_text(json.dumps(data))
    edited = create("coder", ctx, texts_file=str(out))
    assert edited.evidence_key() != from_file.evidence_key()
    assert not np.allclose(edited.evidence(images)["scores"], direct.evidence(images)["scores"])
    # one line for each bad input
    bad = CliRunner().invoke(app, ["texts", "--labels", str(mined_index / "classes.txt"), "--out", str(out),
                                   "--model", TINY, "--sources", "names,memory"])
    assert isinstance(bad.exception, XMError) and "needs an index" in str(bad.exception)
    with pytest.raises(XMError, match="not an xm text set"):
        read_textset(desc)
    with pytest.raises(XMError, match="no key matches class.*xm texts --labels.*--classnames"):
        create("coder", Context(None, TINY, CLASSES + ["kite"], ["{}"]), texts_file=str(out))


def _imagefolder(root: Path, test_labels: list[int]) -> Path:
    """train/ val/ test/ class folders of near-duplicate images; test image i goes to class test_labels[i]."""
    for split, n, offset in (("train", 3, 0), ("val", 3, 5000)):
        for e in _examples(n, offset, split):
            target = root / split / CLASSES[e.label] / f"{e.key.replace('/', '_')}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            e.load().save(target)
    for e, y in zip(_examples(4, 9000, "test"), test_labels):
        target = root / "test" / CLASSES[y] / f"{e.key.replace('/', '_')}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        e.load().save(target)
    for c in CLASSES:
        (root / "test" / c).mkdir(parents=True, exist_ok=True)
    return root


def test_benchmark_ignores_test_labels(tmp_path) -> None:
    """Through the benchmark runner: shuffled test labels give identical coder and coder-rerank
    predictions, and identical adapter fits (alpha, beta) and predictions."""
    from xm.evaluation.datasets import load_dataset
    from xm.evaluation.runner import BenchmarkConfig, run_benchmark

    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"descriptors": {c: [f"feature {j} of {c}" for j in range(3)] for c in CLASSES},
                                "differences": {a: {b: [f"{a} rather than {b}"] for b in CLASSES if b != a} for a in CLASSES}}))
    true = [e.label for e in _examples(4, 9000, "test")]
    shuffled = list(np.random.default_rng(3).permutation(true))
    runs = {}
    for tag, labels in (("true", true), ("shuffled", shuffled)):
        data = _imagefolder(tmp_path / tag, labels)
        ds = load_dataset("imagefolder", data, "test")
        cfg = BenchmarkConfig(dataset="imagefolder", data_dir=data, index=None, model=TINY, seeds=[1], shots=[2],
                              methods=["coder", "coder-rerank", "coder-adapter", "tip-adapter"], val_per_class=3,
                              options={"descriptions": str(desc), "threshold": 1.0, "augment_passes": 0, "grid": 4,
                                       "search_rounds": 1}, cache_dir=tmp_path / f"cache-{tag}")
        result = run_benchmark(cfg, ds, None)
        names = [Path(it.key).name for it in ds.items]
        runs[tag] = {m: (dict(zip(names, r["predictions"])), [{k: v for k, v in f.items() if "seconds" not in k}
                                                             for f in r.get("fit", [])])
                     for m, r in result["methods"].items()}
    assert set(runs["true"]) == {"coder", "coder-rerank", "coder-adapter@2", "tip-adapter@2"}
    for m in runs["true"]:
        assert runs["true"][m] == runs["shuffled"][m], m
