"""Every dataset loader on a small layout generated in its native format; splits counted right."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xm.errors import XMError
from xm.evaluation.datasets import load_dataset


def _img(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_eurosat_csv_splits(tmp_path) -> None:
    classes = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
               "Residential", "River", "SeaLake"]
    (tmp_path / "label_map.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}))
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        rows = [",Filename,Label,ClassName"]
        for i, c in enumerate(classes):
            for j in range(n):
                rel = f"{c}/{c}_{split}{j}.jpg"
                _img(tmp_path / rel)
                rows.append(f"{i * 10 + j},{rel},{i},{c}")
        _lines(tmp_path / f"{split}.csv", rows)
    for split, n in (("train", 30), ("validation", 20), ("test", 10)):
        ds = load_dataset("eurosat", tmp_path, split)
        assert len(ds) == n and ds.split_source == f"{split}.csv shipped with the data"
    ds = load_dataset("eurosat", tmp_path, "test")
    assert ds.classnames[2] == "brushland or shrubland" and ds.items[2].label == 2
    assert "a centered satellite photo of {}." in ds.templates["clip_benchmark"]


def test_caltech101_lists(tmp_path) -> None:
    for c in ("Faces", "accordion", "BACKGROUND_Google"):
        for j in range(3):
            _img(tmp_path / "101_ObjectCategories" / c / f"image_{j:04d}.jpg")
    _lines(tmp_path / "test.txt", ["accordion/image_0001.jpg", "Faces/image_0002.jpg"])
    ds = load_dataset("caltech101", tmp_path, "test")
    assert len(ds) == 2 and ds.classnames == ["face", "accordion"]
    assert [i.label for i in ds.items] == [1, 0]


def test_cifar_folders_and_native_batches(tmp_path) -> None:
    for c in ("cat", "dog"):
        for j in range(4):
            _img(tmp_path / "f" / "test" / c / f"{j:04d}.jpg")
    assert len(load_dataset("cifar10", tmp_path / "f")) == 8
    b = tmp_path / "n" / "cifar-10-batches-py"
    b.mkdir(parents=True)
    (b / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "cat"]}))
    (b / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((5, 3072), np.uint8), "labels": [0, 1, 1, 0, 1]}))
    for k in (1, 2):
        (b / f"data_batch_{k}").write_bytes(pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 0]}))
    ds = load_dataset("cifar10", tmp_path / "n")
    assert len(ds) == 5 and ds.classnames == ["airplane", "cat"] and ds.items[0].image().size == (32, 32)
    assert len(load_dataset("cifar10", tmp_path / "n", "train")) == 6
    c = tmp_path / "c" / "cifar-100-python"
    c.mkdir(parents=True)
    (c / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    (c / "test").write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [3, 99, 0, 5]}))
    ds = load_dataset("cifar100", tmp_path / "c")
    assert len(ds) == 4 and len(ds.classnames) == 100 and ds.items[1].label == 99


def test_pets(tmp_path) -> None:
    for name in ("Abyssinian_1", "Abyssinian_2", "great_pyrenees_7"):
        _img(tmp_path / "images" / f"{name}.jpg")
    _lines(tmp_path / "annotations" / "test.txt", ["Abyssinian_1 1 1 1", "great_pyrenees_7 2 2 1"])
    _lines(tmp_path / "annotations" / "trainval.txt", ["Abyssinian_2 1 1 1"])
    ds = load_dataset("oxford_pets", tmp_path)
    assert len(ds) == 2 and ds.classnames == ["abyssinian", "great pyrenees"]
    assert len(load_dataset("pets", tmp_path, "train")) == 1


def test_cars_and_flowers_mat_files(tmp_path) -> None:
    from scipy.io import savemat

    cars = tmp_path / "cars"
    (cars / "devkit").mkdir(parents=True)
    savemat(cars / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)})
    annos = np.array([("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 2)], dtype=[("fname", "O"), ("class", "O")])
    savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": annos})
    for f in ("00001.jpg", "00002.jpg", "00003.jpg"):
        _img(cars / "cars_test" / f)
    ds = load_dataset("stanford_cars", cars)
    assert len(ds) == 3 and [i.label for i in ds.items] == [1, 0, 1] and ds.classnames[1] == "acura rl sedan 2012"

    fl = tmp_path / "flowers"
    fl.mkdir()
    savemat(fl / "imagelabels.mat", {"labels": np.array([1, 2, 2, 1])})
    savemat(fl / "setid.mat", {"tstid": np.array([1, 3, 4]), "trnid": np.array([2]), "valid": np.array([2])})
    (fl / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))
    for i in range(1, 5):
        _img(fl / "jpg" / f"image_{i:05d}.jpg")
    ds = load_dataset("flowers102", fl)
    assert len(ds) == 3 and [i.label for i in ds.items] == [0, 1, 0] and ds.classnames[0] == "pink primrose"


def test_food101(tmp_path) -> None:
    _lines(tmp_path / "meta" / "classes.txt", ["apple_pie", "baby_back_ribs"])
    _lines(tmp_path / "meta" / "test.txt", ["apple_pie/1", "baby_back_ribs/2", "baby_back_ribs/3"])
    _lines(tmp_path / "meta" / "train.txt", ["apple_pie/4"])
    for r in ("apple_pie/1", "baby_back_ribs/2", "baby_back_ribs/3", "apple_pie/4"):
        _img(tmp_path / "images" / f"{r}.jpg")
    ds = load_dataset("food101", tmp_path)
    assert len(ds) == 3 and ds.classnames == ["apple pie", "baby back ribs"] and ds.items[2].label == 1


def test_aircraft(tmp_path) -> None:
    _lines(tmp_path / "data" / "variants.txt", ["707-320", "A300B4"])
    _lines(tmp_path / "data" / "images_variant_test.txt", ["1025794 707-320", "1340192 A300B4"])
    _lines(tmp_path / "data" / "images_variant_trainval.txt", ["1000000 A300B4"])
    for i in ("1025794", "1340192", "1000000"):
        _img(tmp_path / "data" / "images" / f"{i}.jpg")
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert len(ds) == 2 and [i.label for i in ds.items] == [0, 1]
    assert len(load_dataset("aircraft", tmp_path, "train")) == 1


def test_sun397(tmp_path) -> None:
    root = tmp_path / "SUN397"
    _lines(root / "ClassName.txt", ["/a/abbey", "/b/bakery/shop"])
    files = ["/a/abbey/sun_1.jpg", "/b/bakery/shop/sun_2.jpg", "/b/bakery/shop/sun_3.jpg"]
    for f in files:
        _img(root / f.lstrip("/"))
    _lines(root / "Partitions" / "Testing_01.txt", files[:2])
    ds = load_dataset("sun397", tmp_path)
    assert len(ds) == 2 and ds.classnames == ["abbey", "shop bakery"] and [i.label for i in ds.items] == [0, 1]


def test_dtd(tmp_path) -> None:
    for c in ("banded", "zigzagged"):
        for j in range(2):
            _img(tmp_path / "images" / c / f"{c}_{j}.jpg")
    _lines(tmp_path / "labels" / "test1.txt", ["banded/banded_0.jpg", "zigzagged/zigzagged_1.jpg", "zigzagged/zigzagged_0.jpg"])
    ds = load_dataset("dtd", tmp_path)
    assert len(ds) == 3 and [i.label for i in ds.items] == [0, 1, 1]


def test_ucf101_middle_frames(tmp_path) -> None:
    for c in ("ApplyEyeMakeup", "Basketball"):
        for g in (1, 2):
            _img(tmp_path / "UCF-101-midframes" / c / f"v_{c}_g0{g}_c01.jpg")
    _lines(tmp_path / "ucfTrainTestlist" / "testlist01.txt", ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
                                                               "Basketball/v_Basketball_g02_c01.avi"])
    ds = load_dataset("ucf101", tmp_path)
    assert len(ds) == 2 and ds.classnames == ["apply eye makeup", "basketball"] and ds.items[1].label == 1


def test_imagenet_family(tmp_path) -> None:
    _lines(tmp_path / "classnames.txt", ["n01440764 tench", "n01443537 goldfish", "n01484850 great white shark"])
    for w in ("n01440764", "n01443537", "n01484850"):
        for j in range(2):
            _img(tmp_path / "val" / w / f"{j}.JPEG")
    ds = load_dataset("imagenet", tmp_path, "val")
    assert len(ds) == 6 and ds.classnames == ["tench", "goldfish", "great white shark"]
    for j in range(3):  # ImageNet-A/R: a subset of the wnids
        _img(tmp_path / "imagenet-a" / "n01443537" / f"a{j}.jpg")
    ds = load_dataset("imagenet-a", tmp_path)
    assert len(ds) == 3 and ds.classnames == ["goldfish"]
    for i in (0, 2):  # ImageNetV2: folders are class indices
        _img(tmp_path / "imagenetv2-matched-frequency-format-val" / str(i) / "x.jpeg")
    ds = load_dataset("imagenetv2", tmp_path)
    assert len(ds) == 2 and ds.classnames == ["tench", "great white shark"]
    _img(tmp_path / "sketch" / "n01484850" / "s.JPEG")
    assert load_dataset("imagenet-sketch", tmp_path).classnames == ["great white shark"]


def test_imagefolder_and_coop_split(tmp_path) -> None:
    for c in ("alpha", "beta"):
        for j in range(3):
            _img(tmp_path / "images" / c / f"{j}.jpg")
    assert len(load_dataset("imagefolder", tmp_path / "images")) == 6
    split = {"train": [["alpha/0.jpg", 0, "alpha"], ["beta/0.jpg", 1, "beta"]],
             "val": [["alpha/1.jpg", 0, "alpha"]],
             "test": [["alpha/2.jpg", 0, "alpha"], ["beta/1.jpg", 1, "beta"], ["beta/2.jpg", 1, "beta"]]}
    (tmp_path / "split_zhou_Test.json").write_text(json.dumps(split))
    ds = load_dataset("caltech101", tmp_path, "test", split_file=tmp_path / "split_zhou_Test.json")
    assert len(ds) == 3 and ds.classnames == ["alpha", "beta"] and ds.split_source.startswith("CoOp split file")
    assert len(load_dataset("caltech101", tmp_path, "val", split_file=tmp_path / "split_zhou_Test.json")) == 1


def test_bad_dataset_inputs(tmp_path) -> None:
    with pytest.raises(XMError, match="unknown"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(XMError, match="no such data folder"):
        load_dataset("eurosat", tmp_path / "nope")
    with pytest.raises(XMError, match="test.csv"):
        load_dataset("eurosat", tmp_path)
