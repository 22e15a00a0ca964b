"""The user's xm folder (`XM_HOME`): where indexes are built without `--out`, which one is
the default for `xm classify` and `xm benchmark` without `--index`, and where datasets
are looked for without `--data-dir`.

    $XM_HOME/                    default: $XDG_DATA_HOME/xm, ~/.local/share/xm (Linux),
      indexes/<name>/            ~/Library/Application Support/xm (macOS), %LOCALAPPDATA%\\xm
      default.json               {"name": ...}: the latest complete build, or `xm indexes --default`
      data/<dataset>/            datasets (also $XM_DATA/<dataset>)
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from xm.errors import XMError
from xm.indexes.layout import write_json

# where each dataset is published (for the line that says where to get it)
PUBLISHED = {
    "eurosat": "https://github.com/phelber/EuroSAT (RGB), splits as CSV",
    "caltech101": "https://data.caltech.edu/records/mzrjq-6wc02 (with CoOp's split_zhou_Caltech101.json)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar.html",
    "imagenet": "https://image-net.org",
}


def home() -> Path:
    if os.environ.get("XM_HOME"):
        return Path(os.environ["XM_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "xm"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "xm"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")).expanduser() / "xm"


def indexes_dir() -> Path:
    return home() / "indexes"


def name_for_source(source: str) -> str:
    """A folder name for an index built from `source` (its last path component, made safe)."""
    base = Path(source.rstrip("/")).stem if source not in ("laion400m", "laion400m-embeddings") else source
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "index"


def default_out(source: str) -> Path:
    return indexes_dir() / name_for_source(source)


def list_indexes() -> list[Path]:
    folder = indexes_dir()
    return sorted(p for p in folder.iterdir() if (p / "manifest.json").is_file()) if folder.is_dir() else []


def set_default(name: str) -> Path:
    target = indexes_dir() / name
    if not (target / "manifest.json").is_file():
        known = ", ".join(p.name for p in list_indexes()) or "none yet"
        raise XMError(f"xm indexes --default {name}: no complete index of that name under {indexes_dir()} (have: {known})")
    write_json(home() / "default.json", {"name": name})
    return target


def default_index() -> Path | None:
    f = home() / "default.json"
    try:
        name = json.loads(f.read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    target = indexes_dir() / name
    return target if (target / "manifest.json").is_file() else None


def require_index(index: Path | None) -> Path:
    """`--index`, or the default index, or one line saying how to get one."""
    if index is not None:
        return index
    found = default_index()
    if found is None:
        raise XMError(f"--index: not given and there is no default index in {indexes_dir()}; build one with "
                      "`xm build-index --source ...` (it becomes the default) or pass --index")
    return found


def find_dataset(name: str, data_dir: Path | None) -> Path:
    """`--data-dir`, else $XM_DATA/<name>, else $XM_HOME/data/<name>; or one line saying where to put it."""
    if data_dir is not None:
        return data_dir
    places = ([Path(os.environ["XM_DATA"]) / name] if os.environ.get("XM_DATA") else []) + [home() / "data" / name]
    for p in places:
        if p.is_dir():
            return p
    where = PUBLISHED.get(name, "its publisher's site")
    raise XMError(f"--data-dir: not given and {name} is not in {' or '.join(map(str, places))}; "
                  f"put it there in its native layout (published at {where}) or pass --data-dir")
