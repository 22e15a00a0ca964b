"""CODER as the authors' released code builds its texts: per-dataset templates (data),
the analogous filter, one-vs-one rendering; class keys matched under either naming; the
α/β search inside its stated ranges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_coder import FakeEncoder
from xm.errors import XMError
from xm.evaluation.classnames import classnames_for
from xm.methods.tip_adapter import search_alpha_beta
from xm.texts import TextOptions, build_textset, read_descriptions
from xm.texts.templates import coder_templates, datasets
from xm.texts.textset import Text, TextSet


def test_every_dataset_of_the_authors_has_templates() -> None:
    assert set(datasets()) >= {"eurosat", "food-101", "oxford_flowers", "Aircraft", "oxford-pet", "ucf101", "DTD",
                               "places-365", "CUB200", "caltech-101", "ImageNet", "ImageNet-V2"}
    for d in datasets():
        for task in ("zero-shot", "few-shot"):
            t = coder_templates(d, task)
            assert t.name and t.attribute and t.analogous and t.ovo
            assert all("{c}" in x for x in t.name) and all("{att}" in x for x in t.attribute)
            assert all("{ana}" in x for x in t.analogous) and all("{ovo}" in x and "{other}" in x for x in t.ovo)
    eu = coder_templates("eurosat")
    assert eu.name == ("a photo of {c}, satellite domain.",) and eu.attribute == ("A satellite photo of {c} which has {att}.",)
    assert len(eu.ovo) == 8 and coder_templates("food101").dataset == "food-101"  # xm's name -> the authors' key
    # the authors switch pets' and DTD's templates between their zero-shot and few-shot runs
    assert coder_templates("dtd").attribute != coder_templates("dtd", "few-shot").attribute == ("{c} which has {att}",)
    assert coder_templates("oxford_pets").name == ("a photo of a {c}, a type of pet.",)
    assert coder_templates("no-such-set").dataset == "default" and len(coder_templates(None).ovo) == 7


def _desc(tmp_path, data) -> str:
    p = tmp_path / "desc.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_eurosat_texts_use_the_authors_templates(tmp_path) -> None:
    classes = ["forest", "river"]
    texts = {"a photo of forest, satellite domain.": [1, 0, 0], "a photo of river, satellite domain.": [0, 1, 0],
             "a photo of forest": [1, 0, 0], "a photo of river": [0, 1, 0], "a photo of woodland": [0.99, 0.1, 0],
             "a photo of creek": [0.2, 0.98, 0.1]}
    enc = FakeEncoder(texts)
    path = _desc(tmp_path, {"descriptors": {"forest": ["tall trees"], "river": ["water"]},
                            "analogous": {"forest": ["woodland", "creek"]},
                            "differences": {"forest": {"river": ["a green canopy"]}}})
    ts = build_textset(classes, enc, TextOptions(descriptions=path, dataset="eurosat"))
    assert [t.text for t in ts.of("forest", ("attribute",))] == ["A satellite photo of forest which has tall trees."]
    # the authors' filter: "a photo of {ana}" against the OTHER classes' "a photo of {c}" only
    assert [t.text for t in ts.of("forest", ("analogous",))] == ["A satellite photo of a forest similar to woodland."]
    assert [d["analogous"] for d in ts.dropped] == ["creek"] and "'river'" in ts.dropped[0]["reason"]
    ovo = [t.text for t in ts.of("forest", ("ovo",))]
    assert len(ovo) == 8 and ovo[0] == "The unique utilization of a green canopy in satellite photos makes forest different from river."
    assert ts.meta["templates"]["dataset"] == "eurosat"


def test_descriptions_match_either_naming_and_case(tmp_path) -> None:
    clip_names, coop_names = classnames_for("eurosat"), classnames_for("eurosat", "coop")
    assert clip_names and coop_names
    by_clip = _desc(tmp_path, {c: [f"feature of {c}"] for c in clip_names})
    d = read_descriptions(by_clip, coop_names, "eurosat")  # CLIP's keys, CoOp's labels: all ten classes
    assert sorted(d.descriptors) == sorted(coop_names) and not d.unmatched
    assert d.descriptors["Herbaceous Vegetation Land"] == ["feature of brushland or shrubland"]
    lower = _desc(tmp_path, {"forest": ["trees"], "RIVER": ["water"]})
    assert read_descriptions(lower, ["Forest", "River"]).descriptors == {"Forest": ["trees"], "River": ["water"]}
    with pytest.raises(XMError, match=r"no key matches class\(es\) 'River'.*'lake'.*--classnames"):
        read_descriptions(_desc(tmp_path, {"forest": ["trees"], "lake": ["water"]}), ["Forest", "River"])
    # without the dataset, the other naming is unknown: the four classes named otherwise are refused in one line
    with pytest.raises(XMError, match="--classnames") as err:
        read_descriptions(by_clip, coop_names)
    assert "\n" not in str(err.value)


def test_texts_file_matches_labels_under_either_naming() -> None:
    clip_names, coop_names = classnames_for("eurosat"), classnames_for("eurosat", "coop")
    assert clip_names and coop_names
    ts = TextSet(list(clip_names), {c: [Text(f"a photo of {c}", "name", "names")] for c in clip_names})
    ts.add("forest", Text("forest, not river", "ovo", "descriptions", versus="river"))
    got = ts.for_classes(coop_names, "texts.json", "eurosat")
    assert got.classes == coop_names and got.of("Sea or Lake")[0].text == "a photo of lake or sea"
    assert got.of("Forest", ("ovo",))[0].versus == "River"
    with pytest.raises(XMError, match="no key matches.*Sea or Lake.*--classnames"):
        ts.for_classes(coop_names, "texts.json")  # the dataset's namings unknown


def test_alpha_beta_search_stays_in_its_ranges() -> None:
    # two classes, one key each; accuracy keeps growing with β beyond beta_max, so a finer
    # grid that left the range would be chosen there
    delta, margins = 1e-3, np.linspace(0.05, 0.95, 40)
    zs = np.stack([np.zeros_like(margins), margins], axis=1)  # the zero-shot term favours the wrong class
    affinity = np.stack([np.ones_like(margins), np.full_like(margins, 1 - delta)], axis=1)
    found = search_alpha_beta(zs, affinity, np.eye(2), [0] * len(margins), (1.0, 1.0), (1.0, 1000.0), 12, 3,
                              start=(5.0, 5000.0))
    assert found["alpha"] == 1.0 and 1.0 <= found["beta"] <= 1000.0
    assert found["beta"] == pytest.approx(1000.0)  # the best point inside the range: its top end
