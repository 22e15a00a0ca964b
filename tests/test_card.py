"""The card's three commands, as written, for a new user (a fresh HOME, offline)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, TINY_WIDE, make_image, write_caption_folder

pytestmark = pytest.mark.slow
CLASSES = ["AnnualCrop", "Forest", "River"]


@pytest.fixture
def newcomer(tmp_path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XM_HOME", "XM_DATA", "XDG_DATA_HOME", "XDG_CACHE_HOME")}
    return {**env, "HOME": str(home), "XM_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _xm(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xm.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _eurosat(root: Path) -> None:
    """EuroSAT's shipped layout: class folders, split CSVs, label_map.json."""
    rows = {"train": [], "test": []}
    for y, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            name = f"{cls}/{cls}_{i}.jpg"
            make_image(100 * y + i, size=64).save(root / name)
            rows["train" if i < 3 else "test"].append({"": len(rows["test"]), "Filename": name, "Label": y, "ClassName": cls})
    for split, r in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["", "Filename", "Label", "ClassName"])
            w.writeheader()
            w.writerows(r)
    (root / "label_map.json").write_text(json.dumps({c: i for i, c in enumerate(CLASSES)}))


def test_the_cards_commands_as_written(newcomer, tmp_path) -> None:
    # 1. offline, the LAION build fails within seconds, saying how to supply metadata and weights
    t = time.time()
    r = _xm(newcomer, "build-index", "--source", "laion400m")
    assert r.returncode == 2 and time.time() - t < 60
    err = [line for line in r.stderr.splitlines() if line.startswith("xm: error:")]
    assert len(err) == 1 and "--metadata-root" in err[0] and "checkpoint.pt" in err[0], r.stderr
    data_home = Path(newcomer["HOME"]) / ".local" / "share" / "xm"
    assert not (data_home / "indexes" / "laion400m").exists()  # a failed first run leaves nothing behind

    # a memory built without --out goes to the user's folder and becomes the default index
    memory = write_caption_folder(tmp_path / "my-photos", 150, caption=lambda i: f"a photo of {CLASSES[i % 3]} number {i}")
    r = _xm(newcomer, "build-index", "--source", str(memory), "--coarse", TINY, "--fine", TINY_WIDE, "--inference", TINY)
    assert r.returncode == 0, r.stderr
    listed = json.loads(_xm(newcomer, "indexes", "--json").stdout)
    assert [(i["name"], i["default"], i["items"]) for i in listed["indexes"]] == [("my-photos", True, 150)]

    # 2. xm classify image.jpg --labels classes.txt: the default index and its inference encoder
    work = tmp_path / "work"
    work.mkdir()
    make_image(3).save(work / "image.jpg")
    (work / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    r = _xm(newcomer, "classify", "image.jpg", "--labels", "classes.txt", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prediction"] in CLASSES and result["method"] == "xmore"

    # 3. xm benchmark --dataset eurosat: the dataset from the user's data folder, else one line
    r = _xm(newcomer, "benchmark", "--dataset", "eurosat", cwd=work)
    assert r.returncode == 2 and "put it there in its native layout" in r.stderr and "eurosat" in r.stderr
    _eurosat(data_home / "data" / "eurosat")
    r = _xm(newcomer, "benchmark", "--dataset", "eurosat", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    bench = json.loads(r.stdout)
    assert bench["images_evaluated"] == 9 and "xmore" in bench["methods"] and bench["model"] == TINY
