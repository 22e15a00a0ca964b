"""A refused option is a fast one-line error: the commands validate before importing torch
(2-3 s), and `--device auto` (the default) knows there is no GPU without torch where the
machine has no GPU device nodes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xm.encoders import device as device_module
from xm.encoders.device import Device

PROBE = """
import sys
from xm.cli.app import main
sys.argv = ["xm", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    print("exit", exc.code, "torch" in sys.modules)
"""


def test_auto_agrees_with_torch(monkeypatch) -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "mps" if device_module._mps_available() else "cpu"
    assert Device.parse("auto").kind == expected
    # where no GPU node exists (this machine, or a faked absence), auto is the CPU without asking torch
    monkeypatch.setattr(device_module, "_GPU_NODES", ("/nonexistent/nvidiactl",))
    if sys.platform.startswith("linux"):
        assert device_module._no_gpu_possible() and Device.parse("auto") == Device("cpu", (), "auto")
    # and where one exists, torch decides (as it would on a GPU machine)
    monkeypatch.setattr(device_module, "_GPU_NODES", ("/",))
    assert not device_module._no_gpu_possible() and Device.parse("auto").kind == expected


@pytest.mark.parametrize("args", [
    ["build-index", "--out", "OUT", "--source", "/nonexistent/source"],
    ["build-index", "--out", "OUT", "--source", "TMP", "--batch-size", "0"],
    ["classify", "x.jpg", "--labels", "/nonexistent/labels.txt", "--index", "/nonexistent/index"],
    ["benchmark", "--dataset", "nonesuch", "--data-dir", "TMP"],
    ["search", "/nonexistent/index", "--text", "x"],
])
def test_refused_options_do_not_import_torch(args, tmp_path) -> None:
    if not device_module._no_gpu_possible():
        pytest.skip("this machine may have a GPU: auto asks torch")
    args = [a.replace("OUT", str(tmp_path / "out")).replace("TMP", str(tmp_path)) for a in args]
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XM_HOME": str(tmp_path / "home")})
    assert out.stdout.strip().splitlines()[-1] == "exit 2 False", (out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("xm: error: ")
