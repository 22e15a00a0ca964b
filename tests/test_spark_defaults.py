"""Spark's defaults for a shared network, without starting Spark: a local master binds the
driver and its UI to loopback, a cluster master's UI is off unless --spark-ui, the user's
settings win; --spark-ui is refused without --distributor pyspark."""

from __future__ import annotations

import pytest

from xm.errors import XMError
from xm.pipeline import BuildConfig
from xm.pipeline.spark import _loopback_defaults, spark_cause


def test_local_master_binds_loopback_and_cluster_ui_is_off_unless_asked(monkeypatch) -> None:
    monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
    local: dict[str, str] = {}
    _loopback_defaults("local[2]", local, ui=False)
    assert local == {"spark.driver.bindAddress": "127.0.0.1", "spark.driver.host": "127.0.0.1"}
    import os

    assert os.environ["SPARK_LOCAL_IP"] == "127.0.0.1"  # where the JVM binds the UI
    cluster: dict[str, str] = {}
    _loopback_defaults("spark://head:7077", cluster, ui=False)
    assert cluster == {"spark.ui.enabled": "false"}
    asked: dict[str, str] = {}
    _loopback_defaults("spark://head:7077", asked, ui=True)
    assert asked == {}
    mine = {"spark.driver.host": "10.0.0.5"}
    _loopback_defaults("local[2]", mine, ui=False)
    assert mine["spark.driver.host"] == "10.0.0.5"


def test_spark_ui_needs_pyspark_distributor(tmp_path) -> None:
    with pytest.raises(XMError, match="--spark-ui: only with --distributor pyspark"):
        BuildConfig(source=str(tmp_path), out=tmp_path / "o", spark_ui=True).validate()


def test_spark_cause_keeps_the_reason() -> None:
    py4j = ("An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
            ": org.apache.spark.SparkException: Job aborted due to stage failure: Total size of serialized results "
            "of 2 tasks (16.1 KiB) is bigger than spark.driver.maxResultSize (4.0 KiB)\n\tat org.apache...")
    assert spark_cause(RuntimeError(py4j)).startswith("Total size of serialized results of 2 tasks")
    worker = ("An error occurred while calling o1.collect.\nTraceback (most recent call last):\n  File \"x\", line 1\n"
              "ValueError: bad part 00003\n")
    assert spark_cause(RuntimeError(worker)) == "ValueError: bad part 00003"
