"""Spark at a scale the result limit cannot hold, on one local session (`local[2,2]`) whose
`spark.driver.maxResultSize` is 4 KB: the store stage still writes every caption hash (none
comes back through the driver), a job that does return too much fails with Spark's reason in
xm's one line, and the session's web UI listens on loopback only."""

from __future__ import annotations

import functools
import ipaddress
import operator
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark")

from xm.errors import XMError  # noqa: E402
from xm.indexes.layout import Layout, caption_hash, part_name  # noqa: E402
from xm.indexes.store import ShardStore  # noqa: E402
from xm.pipeline import spark  # noqa: E402
from xm.pipeline.build import _store_stage  # noqa: E402
from xm.pipeline.runners.local import LocalRunner  # noqa: E402
from xm.pipeline.runners.spark import SparkRunner  # noqa: E402

pytestmark = pytest.mark.slow
PARTS, ROWS = 4, 1500  # 48 KB of caption hashes: twelve times the result limit


@pytest.fixture(scope="module")
def session():
    fresh_jvm = not _jvm_running()
    saved = os.environ.pop("SPARK_LOCAL_IP", None)  # conftest's default: xm must bind loopback by itself
    try:
        with spark.spark_session("local[2,2]", ["spark.driver.maxResultSize=4k"], "xm test spark scale") as s:
            yield s, fresh_jvm
    finally:
        if saved is not None:
            os.environ["SPARK_LOCAL_IP"] = saved


def _jvm_running() -> bool:
    from pyspark import SparkContext

    return SparkContext._gateway is not None


def _metadata(root: Path) -> list[dict]:
    layout = Layout(root)
    done = []
    for p in range(PARTS):
        # repeated captions too: the hash file keeps one row per item, duplicates included
        captions = [f"caption {p}-{i % 700}" for i in range(ROWS)]
        # the embed stage's rows; two parts where a build begun before the store shards has them
        target = layout.part_rows(part_name(p)) if p % 2 else layout.metadata_file("enc", part_name(p))
        target.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"caption": captions, "url": [f"http://x/{p}/{i}" for i in range(ROWS)]}).to_parquet(target)
        done.append({"part": part_name(p), "rows": ROWS})
    return done


def test_store_under_a_tiny_result_limit_equals_the_local_store(session, tmp_path) -> None:
    s, _ = session
    here, there = Layout(tmp_path / "local"), Layout(tmp_path / "spark")
    done = _metadata(here.root)
    _metadata(there.root)
    # shards of 1,000 ids: six tasks, most spanning two parts, each writing its hashes in place
    _store_stage(here, "enc", done, LocalRunner(), lambda label, total: lambda n: None, shard_rows=1000)
    _store_stage(there, "enc", done, SparkRunner(s, "test"), lambda label, total: lambda n: None, shard_rows=1000)
    expected = [caption_hash(f"caption {p}-{i % 700}") for p in range(PARTS) for i in range(ROWS)]
    assert np.load(here.caption_hash).tolist() == expected
    assert np.load(there.caption_hash).tolist() == expected
    for i in range(PARTS * ROWS // 1000):
        assert here.store_shard(i).read_bytes() == there.store_shard(i).read_bytes()
    table = ShardStore([there.store_shard(i) for i in range(6)], PARTS * ROWS, 1000).table(0, PARTS * ROWS)
    assert table.column("id").to_pylist() == list(range(PARTS * ROWS))
    assert table.column("caption").to_pylist() == [f"caption {p}-{i % 700}" for p in range(PARTS) for i in range(ROWS)]
    assert not list(there.store.glob(".*"))  # no temporary file left


def test_a_spark_failure_keeps_its_cause(session) -> None:
    s, _ = session
    with pytest.raises(XMError) as caught:
        # 8 KB per task (a function the executors can import: operator.mul on bytes)
        spark.run_tasks(s, functools.partial(operator.mul, b"x" * 8192), [1, 1], "xm big results")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("xm big results: a Spark job failed (")
    assert "maxResultSize" in message, message


def test_local_spark_ui_listens_on_loopback_only(tmp_path) -> None:
    """In a fresh process: where the UI binds is fixed when the JVM starts, and this suite's JVM
    may have been started by an earlier test (with other settings)."""
    import subprocess
    import sys

    script = tmp_path / "ui.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_spark_scale import _listening_addresses\n"
        "from xm.pipeline import spark\n"
        "with spark.spark_session('local[1]', [], 'xm test spark ui') as s:\n"
        "    url = s.sparkContext.uiWebUrl\n"
        "    print(url)\n"
        "    print(sorted(_listening_addresses(int(url.rsplit(':', 1)[1]))) if url else None)\n")
    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}  # xm must bind loopback by itself
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    url, listening = out.stdout.strip().splitlines()[-2:]
    assert url.startswith("http://127.0.0.1:"), url
    assert listening == "['127.0.0.1']", listening


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on `port` (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(address) == 8:
                    found.add(".".join(str(b) for b in bytes.fromhex(address)[::-1]))
                else:  # four little-endian 32-bit words; an IPv4-mapped address read as its IPv4 form
                    raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))
                    v6 = ipaddress.IPv6Address(raw)
                    found.add(str(v6.ipv4_mapped or v6))
    return found
