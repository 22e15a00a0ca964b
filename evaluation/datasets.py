"""Dataset loaders from their native on-disk layouts, CoOp split files, and class names.

Every loader returns a `DatasetSplit`: the images of one split with integer labels,
the class names, the dataset's prompt templates, and a description of which split it is.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xm.encoders.images import IMAGE_SUFFIXES, load_image, to_rgb
from xm.errors import XMError
from xm.evaluation.classnames import classnames_for, clean_name, templates_for


@dataclass
class Item:
    key: str  # stable identity inside the dataset (relative path)
    label: int
    path: Path | None = None
    array: np.ndarray | None = None  # datasets shipped as arrays (CIFAR batches)

    def image(self) -> Image.Image:
        if self.path is not None:
            return load_image(self.path)
        if self.array is None:
            raise ValueError("a dataset item needs a path or an array")
        return to_rgb(Image.fromarray(self.array))


@dataclass
class DatasetSplit:
    dataset: str
    split: str
    split_source: str
    classnames: list[str]
    items: list[Item]
    templates: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "split_source": self.split_source,
                "images": len(self.items), "classes": len(self.classnames)}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise XMError(f"{path}: missing ({what})")
    return path


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _from_class_folders(root: Path, names: list[str] | None = None) -> tuple[list[str], list[Item]]:
    classes = sorted(d.name for d in _need(root, "a folder per class").iterdir() if d.is_dir())
    if not classes:
        raise XMError(f"{root}: no class folders")
    items = [Item(p.relative_to(root).as_posix(), i, p) for i, c in enumerate(classes) for p in _images_under(root / c)]
    return names or classes, items


# ------------------------------------------------------------------ CoOp split files

_COOP_IMAGE_DIRS = ("", "2750", "images", "jpg", "101_ObjectCategories", "SUN397", "UCF-101-midframes", "data/images")


def load_coop_split(name: str, data_dir: Path, split_file: Path, split: str) -> DatasetSplit:
    """CoOp's split_zhou_<Dataset>.json: {train|val|test: [[relative_path, label, classname], ...]}."""
    try:
        data = json.loads(Path(split_file).read_text())
    except (OSError, ValueError) as exc:
        raise XMError(f"{split_file}: unreadable split file ({exc})") from exc
    key = {"validation": "val"}.get(split, split)
    if key not in data:
        raise XMError(f"{split_file}: no {key!r} split (has {', '.join(data)})")
    rows = data[key]
    names: dict[int, str] = {}
    for _, label, cname in (r for part in data.values() for r in part):
        names[int(label)] = cname
    classnames = [names[i] for i in range(max(names) + 1)]
    base = next((data_dir / d for d in _COOP_IMAGE_DIRS if rows and (data_dir / d / rows[0][0]).is_file()), None)
    if base is None:
        raise XMError(f"{data_dir}: cannot find {rows[0][0] if rows else 'images'} of {split_file} under it")
    items = [Item(rel, int(label), base / rel) for rel, label, _ in rows]
    return DatasetSplit(name, key, f"CoOp split file {Path(split_file).name}", classnames, items)


# ------------------------------------------------------------------ native layouts

def _eurosat(d: Path, split: str) -> DatasetSplit:
    csv_file = _need(d / f"{split}.csv", "EuroSAT split CSV (train/validation/test.csv)")
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    label_map = json.loads((d / "label_map.json").read_text()) if (d / "label_map.json").is_file() else None
    if label_map is None:
        label_map = {r["ClassName"]: int(r["Label"]) for r in rows}
    folders = [c for c, _ in sorted(label_map.items(), key=lambda kv: kv[1])]
    base = d / "2750" if (d / "2750").is_dir() else d
    items = [Item(r["Filename"], int(r["Label"]), base / r["Filename"]) for r in rows]
    return DatasetSplit("eurosat", split, f"{csv_file.name} shipped with the data", folders, items)


def _caltech101(d: Path, split: str) -> DatasetSplit:
    root = _need(d / "101_ObjectCategories", "Caltech-101 image folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("BACKGROUND_Google", "Faces_easy"))
    index = {c: i for i, c in enumerate(classes)}
    listing = d / f"{split}.txt"
    if listing.is_file():
        rels = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        source = f"{listing.name} shipped with the data"
    else:
        rels = [p.relative_to(root).as_posix() for c in classes for p in _images_under(root / c)]
        source = "all images (no split list found)"
    items = [Item(rel, index[rel.split("/")[0]], root / rel) for rel in rels]
    return DatasetSplit("caltech101", split, source, classes, items)


def _cifar(d: Path, split: str, fine: bool) -> DatasetSplit:
    name = "cifar100" if fine else "cifar10"
    batch_dir = d / ("cifar-100-python" if fine else "cifar-10-batches-py")
    if batch_dir.is_dir():  # the native python pickle batches
        meta = pickle.loads((batch_dir / ("meta" if fine else "batches.meta")).read_bytes(), encoding="latin1")
        classes = meta["fine_label_names" if fine else "label_names"]
        files = [batch_dir / ("test" if split == "test" else "train")] if fine else (
            [batch_dir / "test_batch"] if split == "test" else sorted(batch_dir.glob("data_batch_*")))
        items = []
        for f in files:
            batch = pickle.loads(_need(f, "CIFAR batch").read_bytes(), encoding="latin1")
            data = batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = batch["fine_labels" if fine else "labels"]
            items += [Item(f"{f.name}/{i}", int(y), array=data[i]) for i, y in enumerate(labels)]
        return DatasetSplit(name, split, f"{batch_dir.name} batches", list(classes), items)
    classes, items = _from_class_folders(_need(d / split, f"{name} folder <split>/<class>/*.jpg"))
    return DatasetSplit(name, split, f"{split}/ class folders", classes, items)


def _imagefolder(d: Path, split: str) -> DatasetSplit:
    root = d / split if (d / split).is_dir() else d
    classes, items = _from_class_folders(root)
    return DatasetSplit("imagefolder", split if root != d else "all", f"{root.name}/ class folders", classes, items)


def _pets(d: Path, split: str) -> DatasetSplit:
    listing = _need(d / "annotations" / ("test.txt" if split == "test" else "trainval.txt"), "Oxford-IIIT Pets annotations")
    rows = [line.split() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")]
    names: dict[int, str] = {int(r[1]) - 1: r[0].rsplit("_", 1)[0] for r in rows}
    classes = [names.get(i, f"class {i}") for i in range(max(names) + 1)]
    items = [Item(f"{r[0]}.jpg", int(r[1]) - 1, d / "images" / f"{r[0]}.jpg") for r in rows]
    return DatasetSplit("oxford_pets", split, listing.name, classes, items)


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # scipy is a dependency; this guards a broken install
        raise XMError(f"{path}: reading .mat files needs scipy") from exc
    return loadmat(_need(path, "annotation file"), squeeze_me=True)


def _cars(d: Path, split: str) -> DatasetSplit:
    meta = _loadmat(d / "devkit" / "cars_meta.mat")
    classes = [str(c) for c in meta["class_names"]]
    if split == "test":
        annos, folder = _loadmat(d / "cars_test_annos_withlabels.mat")["annotations"], d / "cars_test"
    else:
        annos, folder = _loadmat(d / "devkit" / "cars_train_annos.mat")["annotations"], d / "cars_train"
    items = [Item(str(a["fname"]), int(a["class"]) - 1, folder / str(a["fname"])) for a in annos]
    return DatasetSplit("stanford_cars", split, "devkit annotations", classes, items)


def _flowers(d: Path, split: str) -> DatasetSplit:
    labels = _loadmat(d / "imagelabels.mat")["labels"]
    ids = _loadmat(d / "setid.mat")[{"test": "tstid", "train": "trnid", "validation": "valid", "val": "valid"}.get(split, "tstid")]
    names_file = d / "cat_to_name.json"
    if names_file.is_file():
        mapping = json.loads(names_file.read_text())
        classes = [mapping[str(i + 1)] for i in range(len(mapping))]
    else:
        classes = classnames_for("flowers102") or [f"flower {i + 1}" for i in range(int(np.max(labels)))]
    items = [Item(f"image_{int(i):05d}.jpg", int(labels[int(i) - 1]) - 1, d / "jpg" / f"image_{int(i):05d}.jpg") for i in np.atleast_1d(ids)]
    return DatasetSplit("flowers102", split, "setid.mat", classes, items)


def _food101(d: Path, split: str) -> DatasetSplit:
    classes = [line.strip() for line in _need(d / "meta" / "classes.txt", "Food-101 meta").read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    listing = _need(d / "meta" / ("test.txt" if split == "test" else "train.txt"), "Food-101 split list")
    rels = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    items = [Item(f"{r}.jpg", index[r.split("/")[0]], d / "images" / f"{r}.jpg") for r in rels]
    return DatasetSplit("food101", split, f"meta/{listing.name}", classes, items)


def _aircraft(d: Path, split: str) -> DatasetSplit:
    data = d / "data" if (d / "data").is_dir() else d
    classes = [line.strip() for line in _need(data / "variants.txt", "FGVC-Aircraft variants").read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    listing = _need(data / f"images_variant_{'test' if split == 'test' else 'trainval'}.txt", "FGVC-Aircraft split")
    items = []
    for line in listing.read_text().splitlines():
        if line.strip():
            img, variant = line.strip().split(" ", 1)
            items.append(Item(f"{img}.jpg", index[variant], data / "images" / f"{img}.jpg"))
    return DatasetSplit("fgvc_aircraft", split, listing.name, classes, items)


def _sun397(d: Path, split: str) -> DatasetSplit:
    root = d / "SUN397" if (d / "SUN397").is_dir() else d
    class_paths = [line.strip() for line in _need(root / "ClassName.txt", "SUN397 ClassName.txt").read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(class_paths)}
    classes = [" ".join(reversed(c.strip("/").split("/")[1:])).replace("_", " ") for c in class_paths]
    part = root / "Partitions" / f"{'Testing' if split == 'test' else 'Training'}_01.txt"
    if part.is_file():
        rels, source = [line.strip() for line in part.read_text().splitlines() if line.strip()], part.name
    else:
        rels, source = ["/" + p.relative_to(root).as_posix() for p in _images_under(root)], "all images"
    items = [Item(r, index["/" + "/".join(r.strip("/").split("/")[:-1])], root / r.lstrip("/")) for r in rels]
    return DatasetSplit("sun397", split, source, classes, items)


def _dtd(d: Path, split: str) -> DatasetSplit:
    root = _need(d / "images", "DTD images/")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    listing = _need(d / "labels" / f"{'test' if split == 'test' else 'train'}1.txt", "DTD labels/<split>1.txt")
    rels = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    items = [Item(r, index[r.split("/")[0]], root / r) for r in rels]
    return DatasetSplit("dtd", split, f"labels/{listing.name}", classes, items)


def _ucf101(d: Path, split: str) -> DatasetSplit:
    root = _need(d / "UCF-101-midframes", "UCF101 middle frames (UCF-101-midframes/<Class>/<video>.jpg)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    listing = d / "ucfTrainTestlist" / f"{'testlist' if split == 'test' else 'trainlist'}01.txt"
    if listing.is_file():
        rels = [line.split()[0].rsplit(".", 1)[0] + ".jpg" for line in listing.read_text().splitlines() if line.strip()]
        source = listing.name
    else:
        rels, source = [p.relative_to(root).as_posix() for p in _images_under(root)], "all middle frames"
    items = [Item(r, index[r.split("/")[0]], root / r) for r in rels]
    names = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", c).replace("_", " ") for c in classes]
    return DatasetSplit("ucf101", split, source, names, items)


def _wnid_names(d: Path) -> dict[str, str]:
    for cand in (d / "classnames.txt", d.parent / "classnames.txt"):
        if cand.is_file():
            out = {}
            for line in cand.read_text().splitlines():
                if line.strip():
                    wnid, _, name = line.strip().partition(" ")
                    out[wnid] = name
            return out
    raise XMError(f"{d}/classnames.txt: missing (lines 'n01440764 tench', as CoOp's ImageNet folder has)")


def _imagenet_like(name: str, sub: Callable[[Path, str], Path]) -> Callable[[Path, str], DatasetSplit]:
    def load(d: Path, split: str) -> DatasetSplit:
        names = _wnid_names(d)
        root = sub(d, split)
        folders = sorted(p.name for p in _need(root, f"{name} class folders").iterdir() if p.is_dir())
        if folders and all(f.isdigit() for f in folders):  # ImageNetV2: folders are class indices
            ordered = list(names.values())
            folders = sorted(folders, key=int)
            classes = [ordered[int(f)] for f in folders]
        else:
            classes = [names.get(f, f) for f in folders]
        items = [Item(p.relative_to(root).as_posix(), i, p) for i, f in enumerate(folders) for p in _images_under(root / f)]
        return DatasetSplit(name, split, f"{root.name}/ class folders", classes, items)

    return load


def _first_dir(*names: str) -> Callable[[Path, str], Path]:
    def pick(d: Path, split: str) -> Path:
        for n in names:
            if (d / n.format(split=split)).is_dir():
                return d / n.format(split=split)
        return d

    return pick


LOADERS: dict[str, Callable[[Path, str], DatasetSplit]] = {
    "eurosat": _eurosat,
    "caltech101": _caltech101,
    "cifar10": lambda d, s: _cifar(d, s, fine=False),
    "cifar100": lambda d, s: _cifar(d, s, fine=True),
    "imagefolder": _imagefolder,
    "oxford_pets": _pets,
    "stanford_cars": _cars,
    "flowers102": _flowers,
    "food101": _food101,
    "fgvc_aircraft": _aircraft,
    "sun397": _sun397,
    "dtd": _dtd,
    "ucf101": _ucf101,
    "imagenet": _imagenet_like("imagenet", _first_dir("{split}", "val")),
    "imagenet_a": _imagenet_like("imagenet_a", _first_dir("imagenet-a")),
    "imagenet_r": _imagenet_like("imagenet_r", _first_dir("imagenet-r")),
    "imagenet_sketch": _imagenet_like("imagenet_sketch", _first_dir("sketch", "images")),
    "imagenetv2": _imagenet_like("imagenetv2", _first_dir("imagenetv2-matched-frequency-format-val")),
}
ALIASES = {"pets": "oxford_pets", "oxfordpets": "oxford_pets", "cars": "stanford_cars", "stanfordcars": "stanford_cars",
           "flowers": "flowers102", "aircraft": "fgvc_aircraft", "fgvcaircraft": "fgvc_aircraft",
           "imagenet-a": "imagenet_a", "imagenet-r": "imagenet_r", "imagenet-sketch": "imagenet_sketch",
           "imagenet-v2": "imagenetv2", "food": "food101", "caltech": "caltech101"}


def load_dataset(name: str, data_dir: str | Path, split: str = "test", split_file: str | Path | None = None,
                 classnames_file: str | Path | None = None, names: str = "clip_benchmark") -> DatasetSplit:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in LOADERS:
        raise XMError(f"--dataset {name!r}: unknown; choose from {', '.join(sorted(LOADERS))}")
    d = Path(data_dir)
    if not d.is_dir():
        raise XMError(f"{d}: no such data folder")
    ds = load_coop_split(key, d, Path(split_file), split) if split_file else LOADERS[key](d, split)
    ds.dataset = key
    if not ds.items:
        raise XMError(f"{d}: no images in the {split} split of {key}")
    if classnames_file:
        from xm.methods.zeroshot import read_labels

        labels = read_labels(classnames_file)
        if len(labels) != len(ds.classnames):
            raise XMError(f"{classnames_file}: {len(labels)} names, but {key} has {len(ds.classnames)} classes")
        ds.classnames = labels
    elif not split_file:
        ds.classnames = classnames_for(key, names) or classnames_for(key) or [clean_name(c) for c in ds.classnames]
    ds.templates = templates_for(key)
    return ds
