"""`xm benchmark --protocol authors` against an independent transcription of the X-MoRe
authors' released evaluation (SeonghaEom/X-MoRe, ensemble_with_entropy.py and
clip/custom_clip.py): their caption pre-processing (`ctx_init + " " + caption` with
`ctx_init = "a_photo_of_a"`), their stream order (`torch.manual_seed(seed)`, then a
`DataLoader(shuffle=True)` iterated, the real torch class here), their retrieval as the
METHODS.md spec states it (the first K neighbours' captions, exact-string duplicates dropped,
raw-dot fine re-ranking, top k), their L1 weighting and their unnormalised mix. The
transcription shares no code with xm's methods: it reads the memory and the encoders only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.functional import normalize
from torch.utils.data import DataLoader

from conftest import TINY
from test_classify_e2e import CLASSES, DUPS, build_memory
from xm.encoders import load_encoder
from xm.evaluation.datasets import load_dataset
from xm.evaluation.runner import BenchmarkConfig, run_benchmark
from xm.evaluation.stream_order import stream_order
from xm.memories import open_index
from xm.methods.ensemble import StreamState, Weights, combine

K_COARSE, K_FINE = DUPS + 2, 2  # the pool mixes near-duplicates and distractors: captions compete


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    index, queries, labels = build_memory(root)
    data = root / "data"
    for q, y in zip(queries, labels):
        (data / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        (data / CLASSES[y] / q.name).write_bytes(q.read_bytes())
    return index, data


def _benchmark(index, data, cache, seed: int, protocol: str = "authors", **options) -> list[int]:
    ds = load_dataset("imagefolder", data)
    cfg = BenchmarkConfig(dataset="imagefolder", data_dir=data, index=index, model=TINY, methods=["xmore"],
                          protocol=protocol, seeds=[seed], options={"k_coarse": K_COARSE, "k_fine": K_FINE, **options},
                          cache_dir=cache)
    result = run_benchmark(cfg, ds, open_index(index))
    assert result["protocol_settings"]["stream_order"] == ("torch-dataloader-shuffle" if protocol == "authors" else "numpy-permutation")
    return result["methods"]["xmore"]["predictions"]


def _authors(index, data, seed: int, prefix: str = "a_photo_of_a", torch_order: bool = True) -> list[int]:
    """The authors' evaluation, written out; predictions in dataset order."""
    memory = open_index(index)
    enc, coarse, fine = (load_encoder(s) for s in (TINY, memory.roles["coarse"], memory.roles["fine"]))
    ds = load_dataset("imagefolder", data)
    images = [it.image() for it in ds.items]
    # their prompt learner: "a photo of a" + " " + name + ".", one template
    text = torch.tensor(enc.encode_texts([f"a photo of a {c.replace('_', ' ')}." for c in ds.classnames]))
    scale = float(enc.logit_scale)
    img_logits = scale * normalize(torch.tensor(enc.encode_images(images)), dim=-1) @ text.T
    # retrieval: 200 asked, the first K captions, then exact-string duplicates dropped
    _, ids = memory.search("image", coarse.encode_images(images), min(200, memory.count), encoder=memory.roles["coarse"])
    fine_img = fine.encode_images(images)
    caption_logits = []
    for row in range(len(images)):
        first = [int(i) for i in ids[row] if i >= 0][:K_COARSE]
        texts = memory.captions(first)
        keep = [j for j, t in enumerate(texts) if t not in texts[:j]]
        # raw dot: their fine caption features are not normalised
        _, raw_norms = fine.encode_texts_with_norms([texts[j] for j in keep])
        caps_unit = fine.encode_texts([texts[j] for j in keep])
        score = (caps_unit * raw_norms[:, None]) @ fine_img[row]
        top = [keep[j] for j in np.argsort(-score, kind="stable")[:K_FINE]]
        # their caption_ensemble: tokenize(ctx_init + " " + caption, truncate=True), normalised
        captions = [(prefix + " " + texts[j]) if prefix else texts[j] for j in top]
        cap = normalize(torch.tensor(enc.encode_texts(captions)), dim=-1)
        caption_logits.append(scale * cap @ text.T)
    # their stream: torch.manual_seed(seed) then a shuffled DataLoader, batch size 1
    torch.manual_seed(seed)
    order = [int(b) for b in DataLoader(list(range(len(images))), batch_size=1, shuffle=True)] if torch_order \
        else np.random.default_rng(seed).permutation(len(images)).tolist()
    c = len(ds.classnames)
    uniform = torch.log(torch.tensor(float(c), dtype=torch.float64))

    def coefficient(logits: torch.Tensor) -> torch.Tensor:  # 1 - H(mean of softmaxes) / H(uniform)
        logp = torch.logsumexp(torch.log_softmax(logits.double(), -1), dim=0) - np.log(logits.shape[0])
        return 1 - (-(logp.exp() * logp).sum()) / uniform

    stat_img, stat_cap = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    preds = [0] * len(images)
    for i in order:
        stat_img = torch.cat([stat_img, coefficient(img_logits[i][None])[None]])
        stat_cap = torch.cat([stat_cap, coefficient(caption_logits[i])[None]])
        w_img, w_cap = normalize(stat_img, p=1.0, dim=0)[-1], normalize(stat_cap, p=1.0, dim=0)[-1]
        mix = w_img * torch.softmax(img_logits[i].double(), -1) + w_cap * torch.softmax(caption_logits[i].double(), -1)
        preds[i] = int(mix.mean(0).argmax())  # (k, C) rows averaged, as their accuracy(); no renormalisation
    return preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_protocol_agrees_with_the_transcription_on_every_decision(setting, tmp_path, seed: int) -> None:
    index, data = setting
    ours = _benchmark(index, data, tmp_path / "cache", seed)
    theirs = _authors(index, data, seed)
    assert -1 not in ours  # the memory holds > K neighbours for every image: nothing skipped
    assert ours == theirs  # 100% of decisions


def test_the_transcription_can_disagree(setting, tmp_path) -> None:
    """The agreement above is no accident: without the prefix, or in another order, the
    transcription decides otherwise somewhere (so a protocol missing either would fail)."""
    index, data = setting
    ours = {s: _benchmark(index, data, tmp_path / "cache", s) for s in (0, 1, 2)}
    no_prefix = {s: _authors(index, data, s, prefix="") for s in (0, 1, 2)}
    assert any(ours[s] != no_prefix[s] for s in ours)
    assert _benchmark(index, data, tmp_path / "cache", 0, caption_prefix="") == no_prefix[0]
    numpy_order = {s: _authors(index, data, s, torch_order=False) for s in (0, 1, 2)}
    assert any(ours[s] != numpy_order[s] for s in ours)


def test_the_authors_order_is_their_dataloaders() -> None:
    for seed in (0, 1, 2, 7):
        for n in (1, 2, 33, 1000):
            torch.manual_seed(seed)
            loader = [int(b) for b in DataLoader(list(range(n)), batch_size=1, shuffle=True)]
            assert stream_order(n, seed, "torch-dataloader-shuffle").tolist() == loader
    before = torch.random.get_rng_state()
    stream_order(10, 3, "torch-dataloader-shuffle")
    assert torch.equal(before, torch.random.get_rng_state())  # the global generator is left alone
    assert stream_order(10, 3, "numpy-permutation").tolist() == np.random.default_rng(3).permutation(10).tolist()


def test_renormalising_the_mix_changes_no_ranking() -> None:
    """`combine` renormalises; the authors' mix is not: every class ranking is the same."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        p_img, p_txt = rng.dirichlet(np.ones(9), 2)
        w = Weights(*rng.uniform(0.01, 2, 2))
        ours = combine(p_img, p_txt, w)
        theirs = w.img * p_img + w.txt * p_txt
        assert np.isclose(ours.sum(), 1.0)
        assert np.argsort(-ours, kind="stable").tolist() == np.argsort(-theirs, kind="stable").tolist()
    assert StreamState().count == 0
