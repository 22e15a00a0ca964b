"""Class names and prompt templates per dataset.

Template sets: `paper` is X-MoRe's single "a photo of a {}.", which the X-MoRe authors'
code uses for every dataset; `coop` the per-dataset single prompts of CoOp; `clip_benchmark`
CLIP_benchmark's template lists where we ship them.

Class names: CLIP_benchmark's where we ship them (the default), or CoOp's (the X-MoRe
authors' protocol; a CoOp split file carries its own).
"""

from __future__ import annotations

import re

PAPER = ["a photo of a {}."]

_CLIP_BENCHMARK_NAMES = {
    # CLIP_benchmark's EuroSAT names, in label order (AnnualCrop, Forest, ...)
    "eurosat": ["annual crop land", "forest", "brushland or shrubland", "highway or road",
                "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                "residential buildings or homes or apartments", "river", "lake or sea"],
}

_COOP_NAMES = {
    # CoOp's EuroSAT names, in label order
    "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
                "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"],
}

# CoOp's Caltech-101 fixes of folder names
_CALTECH = {"Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike", "airplanes": "airplane"}

_COOP = {
    "eurosat": ["a centered satellite photo of {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "dtd": ["{} texture."],
    "ucf101": ["a photo of a person doing {}."],
    "sun397": ["a photo of a {}."],
    "stanford_cars": ["a photo of a {}."],
    "caltech101": ["a photo of a {}."],
}

_CLIP_BENCHMARK = {
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.", "a centered satellite photo of the {}."],
    "cifar10": ["a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
                "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
                "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
                "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
                "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}."],
    "dtd": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.", "a photo of a {} object.",
            "a photo of the {} texture.", "a photo of the {} pattern.", "a photo of the {} thing.", "a photo of the {} object."],
}
_CLIP_BENCHMARK["cifar100"] = _CLIP_BENCHMARK["cifar10"]

TEMPLATE_SETS = ("paper", "coop", "clip_benchmark")


def clean_name(folder: str) -> str:
    """A readable class name from a folder or file name."""
    if folder in _CALTECH:
        return _CALTECH[folder]
    name = re.sub(r"^\d+\.", "", folder)
    return name.replace("_", " ").replace("-", " ").strip().lower() if name.isascii() else name


def classnames_for(dataset: str, style: str = "clip_benchmark") -> list[str] | None:
    """Shipped class names of a dataset in the given style (clip_benchmark | coop), or None."""
    return (_COOP_NAMES if style == "coop" else _CLIP_BENCHMARK_NAMES).get(dataset)


def templates_for(dataset: str) -> dict[str, list[str]]:
    return {"paper": PAPER, "coop": _COOP.get(dataset, PAPER), "clip_benchmark": _CLIP_BENCHMARK.get(dataset, _COOP.get(dataset, PAPER))}


def namings(dataset: str | None) -> list[list[str]]:
    """Every naming xm ships for a dataset's classes (CLIP_benchmark's, CoOp's), each in label
    order: a descriptions or texts file keyed by one naming matches labels in another."""
    if not dataset:
        return []
    return [names[dataset] for names in (_CLIP_BENCHMARK_NAMES, _COOP_NAMES) if dataset in names]
