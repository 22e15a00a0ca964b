"""README's "Past one machine" command, run as written against a small source: the same flags,
with the cluster's names replaced by this machine's (the master by `local[2]`, `/shared/` by a
temporary folder, the bucket by one on an S3-compatible server on 127.0.0.1, see
test_object_store.py) and tiny encoders added (the only weights there are offline). It is a
Spark build to `s3://`; what it stores must equal a build of the same parts to a local folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from conftest import TINY, TINY_ROLES, make_image  # noqa: E402
from test_object_store import BUCKET, _content, s3  # noqa: E402, F401
from xm.encoders import load_encoder  # noqa: E402
from xm.memories import open_index  # noqa: E402
from xm.memories.registry import open_memory  # noqa: E402
from xm.pipeline import BuildConfig, build_index  # noqa: E402

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_command() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Past one machine"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip().startswith("xm build-index")]
    assert len(lines) == 1, block
    return shlex.split(lines[0].split("#")[0])


def _laion_parts(root: Path) -> None:
    coarse = load_encoder(TINY)
    for part, n in ((0, 9), (1, 6)):
        caps = [f"laion caption {part}-{j}" for j in range(n)]
        for sub in ("images", "texts", "metadata"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        np.save(root / f"images/img_emb_{part}.npy", coarse.encode_images([make_image(100 * part + j) for j in range(n)]).astype(np.float16))
        np.save(root / f"texts/text_emb_{part}.npy", coarse.encode_texts(caps).astype(np.float16))
        pd.DataFrame({"url": [f"http://laion/{part}/{j}" for j in range(n)], "caption": caps,
                      "NSFW": ["UNLIKELY"] * n}).to_parquet(root / f"metadata/metadata_{part}.parquet")


def test_readme_cluster_example_runs_as_written(s3, tmp_path) -> None:  # noqa: F811
    argv = _readme_command()
    assert argv[:2] == ["xm", "build-index"] and "--distributor" in argv and "--max-index-memory" in argv
    shared = tmp_path / "shared"
    swapped = [re.sub(r"^s3://[^/]+/", f"s3://{BUCKET}/", a.replace("/shared/", f"{shared}/")) for a in argv[1:]]
    swapped = ["local[2]" if a.startswith("spark://") else a for a in swapped]
    roots = [swapped[i + 1] for i, a in enumerate(swapped) if a == "--embeddings-root"]
    assert roots and roots[0].startswith(str(shared))
    _laion_parts(Path(roots[0]))
    roles = ["--coarse", TINY, "--fine", TINY_ROLES["fine"], "--inference", TINY, "--parts", "0,1"]
    env = {**os.environ, **s3, "XM_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "xm.cli", *swapped, *roles], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = swapped[swapped.index("--out") + 1]
    assert out.startswith("s3://") and not (tmp_path / "s3:").exists()
    # the executors wrote the parts to the bucket themselves: the driver's staging folder holds none
    from xm.pipeline.task_mirror import PART_FILES

    staged = [p.relative_to(folder).as_posix() for folder in (shared / "xm-stage").glob("object-store/stage/*/")
              for p in folder.rglob("*") if p.is_file()]
    assert "manifest.json" in staged and not [p for p in staged if p.startswith(PART_FILES)], staged
    # the same parts built on this machine, to a folder
    local = build_index(BuildConfig(source="laion400m-embeddings", embeddings_root=roots[0], parts=[0, 1],
                                    out=tmp_path / "local", **{**TINY_ROLES, "inference": [TINY]}))
    assert local.count == 15
    assert _content(open_memory(out)) == _content(open_index(tmp_path / "local"))
