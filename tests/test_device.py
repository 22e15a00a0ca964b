"""`--device` on the CPU: one parser (auto resolves here, bad values and unusable devices are one
line and exit 2 on every command), the embed stage's worker processes (the artefacts are the same
bytes for any --num-workers), parts shared over several devices exactly once, and a device running
out of memory told as one line naming --batch-size. tests/test_gpu.py runs the same on CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_ROLES, write_caption_folder
from xm.encoders import load_encoder
from xm.encoders.device import CPU, Device
from xm.errors import XMError
from xm.pipeline import BuildConfig, build_index

STAGES = ("embed", "store")
NO_CUDA = not torch.cuda.is_available()
NO_ACCELERATOR = NO_CUDA and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@pytest.mark.skipif(not NO_ACCELERATOR, reason="auto picks the accelerator torch sees")
def test_auto_resolves_to_the_cpu_here() -> None:
    for text in (None, "auto", " AUTO "):
        d = Device.parse(text)
        assert (d.kind, d.torch, d.all, str(d)) == ("cpu", "cpu", ("cpu",), "cpu")
        assert d.describe().startswith("auto -> cpu (")
    assert Device.parse("cpu") == CPU and Device.parse(CPU) is CPU


def test_values_parse_to_one_typed_value() -> None:
    # syntax alone (check=False: what a Spark driver does, its executors holding the GPUs)
    d = Device.parse("cuda:0,1,cuda:3", check=False)
    assert (d.kind, d.indices, d.torch, d.all, str(d)) == ("cuda", (0, 1, 3), "cuda:0", ("cuda:0", "cuda:1", "cuda:3"), "cuda:0,1,3")
    assert Device.parse("cuda", check=False).all == ("cuda:0",)
    assert Device.parse("CUDA:2", check=False).torch == "cuda:2"
    assert Device.parse("mps", check=False).all == ("mps",)
    with pytest.raises(XMError, match=r"runs on one device; name one GPU \(cuda:0\)"):
        d.single("xm classify")


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "tpu", "", "cuda:0,0"])
def test_bad_values_are_one_line(text: str) -> None:
    with pytest.raises(XMError) as err:
        Device.parse(text, "--device")
    msg = str(err.value)
    assert msg.startswith(f"--device {text!r}:") and "\n" not in msg, msg


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_where_torch_has_none_is_refused_never_a_cpu_fallback(tmp_path) -> None:
    for text in ("cuda", "cuda:1", "cuda:0,1"):
        with pytest.raises(XMError, match=rf"^--device {text}: torch sees no CUDA GPU here"):
            Device.parse(text)
    with pytest.raises(XMError, match="torch sees no CUDA GPU"):
        BuildConfig(source=str(tmp_path), out=tmp_path / "o", device="cuda").validate()
    # the Python API's edges parse too
    from xm.classify import Classifier
    from xm.evaluation.runner import BenchmarkConfig, run_benchmark
    from xm.training.reco import TrainConfig, train_reco

    with pytest.raises(XMError, match="torch sees no CUDA GPU"):
        Classifier(None, ["cat", "dog"], method="clip", model=TINY, device="cuda")
    with pytest.raises(XMError, match="torch sees no CUDA GPU"):
        run_benchmark(BenchmarkConfig("x", tmp_path, None, device="cuda"), None, None)  # type: ignore[arg-type]
    with pytest.raises(XMError, match="torch sees no CUDA GPU"):
        train_reco(TrainConfig(index=tmp_path, device="cuda"))


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """Run the `xm` command in this process; (exit code, stderr)."""
    from xm.cli.app import main

    saved = sys.argv
    sys.argv = ["xm", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = saved
    code = exc.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


COMMANDS = [
    ["build-index", "--source", "{tmp}/src", "--out", "{tmp}/idx"],
    ["classify", "{tmp}/a.jpg", "--labels", "{tmp}/labels.txt", "--method", "clip", "--model", TINY],
    ["benchmark", "--dataset", "eurosat", "--methods", "clip", "--model", TINY],
    ["serve", "{tmp}/idx"],
    ["train", "reco", "--index", "{tmp}/idx"],
    ["search", "{tmp}/idx", "--text", "a dog"],
    ["texts", "--labels", "{tmp}/labels.txt", "--out", "{tmp}/t.json", "--model", TINY],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]) if c[0] == "train" else c[0])
def test_every_command_refuses_a_bad_device_in_one_line_exit_2(command: list[str], tmp_path, capsys) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    code, err = _main([*args, "--device", "gpu0"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("xm: error: --device 'gpu0': unknown device"), err
    if NO_CUDA:
        code, err = _main([*args, "--device", "cuda"], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "--device cuda: torch sees no CUDA GPU here" in lines[0], err
    if command[0] != "build-index":  # only the build shares parts out over several GPUs
        code, err = _main([*args, "--device", "cuda:0,1"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_the_cli_says_cuda_is_missing_with_exit_2(tmp_path) -> None:
    src = write_caption_folder(tmp_path / "src", 2)
    r = subprocess.run([sys.executable, "-m", "xm.cli", "build-index", "--source", str(src), "--out", str(tmp_path / "o"),
                        "--device", "cuda"], capture_output=True, text=True)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--device cuda: torch sees no CUDA GPU here" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()  # refused before any work


def _artefacts(root: Path) -> dict[str, bytes]:
    """Every file of a built index, byte for byte, but what records time rather than data: the
    manifest's build time and id, the last build's summary, and the index records' measured
    query speeds (their `tuning` and `autofaiss` reports; the index and its parameters are compared)."""
    out = {}
    for p in sorted(root.rglob("*")):
        name = p.relative_to(root).as_posix()
        if not p.is_file() or name in ("manifest.json", "_work/last_build.json"):
            continue
        data = p.read_bytes()
        if p.name == "build.json":
            record = json.loads(data)
            data = json.dumps({k: v for k, v in record.items() if k not in ("tuning", "autofaiss")}).encode()
        out[name] = data
    return out


def _source(tmp_path: Path) -> Path:
    src = write_caption_folder(tmp_path / "src", 27)
    (src / "im005.jpg").write_bytes(b"not an image")  # a failure inside one worker's batch
    return src


def test_num_workers_2_builds_the_same_bytes_as_0(tmp_path) -> None:
    src = _source(tmp_path)
    summaries, trees = [], []
    for workers in (0, 2):
        out = tmp_path / f"idx-{workers}"
        # the embed stage is what the workers feed; the full build (indexes, manifest) is the gpu test's
        summaries.append(build_index(BuildConfig(source=str(src), out=out, shard_size=10, batch_size=3, stages=STAGES,
                                                 num_workers=workers, device="cpu", **TINY_ROLES)))
        trees.append(_artefacts(out))
    assert summaries[0].count == summaries[1].count == 26
    assert summaries[0].failures == summaries[1].failures == {"failed_to_decode": 1}
    assert summaries[1].device.startswith("cpu (")
    assert trees[0].keys() == trees[1].keys() and len(trees[0]) > 10
    different = [name for name in trees[0] if trees[0][name] != trees[1][name]]
    assert not different, different
    with pytest.raises(XMError, match=r"^--num-workers -1: must be 0"):
        BuildConfig(source=str(src), out=tmp_path / "bad", num_workers=-1).validate()


def test_several_devices_embed_disjoint_parts_exactly_once(tmp_path, monkeypatch) -> None:
    """Parts shared out over two devices (two CPU threads here; GPUs on a CUDA machine): each part
    embedded once, the same bytes as one device."""
    import xm.pipeline.build as build
    import xm.pipeline.multi_device as multi

    src = _source(tmp_path)
    one = tmp_path / "one"
    build_index(BuildConfig(source=str(src), out=one, shard_size=5, batch_size=3, num_workers=0, device="cpu",
                            stages=STAGES, **TINY_ROLES))
    calls: list[tuple[int, str]] = []
    real = multi.embed_part

    def counting(part, *args, **kwargs):
        calls.append((threading.get_ident(), part.name))
        return real(part, *args, **kwargs)

    monkeypatch.setattr(multi, "embed_part", counting)
    monkeypatch.setattr(build, "spread", lambda device: [CPU, Device("cpu", (), "cpu")])
    two = tmp_path / "two"
    summary = build_index(BuildConfig(source=str(src), out=two, shard_size=5, batch_size=3, num_workers=0, device="cpu",
                                      stages=STAGES, **TINY_ROLES))
    parts = [name for _, name in calls]
    assert sorted(parts) == sorted(set(parts)) and len(parts) == 6  # 27 images in parts of 5: each once
    assert summary.parts_per_device == {"cpu": 6}
    assert _artefacts(one) == _artefacts(two)


def test_out_of_memory_is_one_line_naming_batch_size(tmp_path, capsys, monkeypatch) -> None:
    from conftest import make_image

    enc = load_encoder(TINY)

    def oom(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(enc.model, "encode_image", oom)
    with pytest.raises(XMError, match=r"^cpu: out of memory \(CUDA out of memory\. Tried to allocate 2\.00 GiB.*\); lower --batch-size"):
        enc.encode_images([make_image(0)])
    make_image(1).save(tmp_path / "a.jpg")
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    code, err = _main(["classify", str(tmp_path / "a.jpg"), "--labels", str(tmp_path / "labels.txt"), "--method", "clip",
                       "--model", TINY, "--device", "cpu"], capsys)
    lines = [line for line in err.splitlines() if line.strip() and "RANDOM weights" not in line]
    assert code == 2 and lines[-1].startswith("xm: error: cpu: out of memory") and "lower --batch-size" in lines[-1], err
    assert "Traceback" not in err


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from /proc")
def test_ctrl_c_with_decoding_workers_exits_130_and_leaves_no_worker(tmp_path) -> None:
    import os
    import signal
    import time

    # 16 parts: after the first is marked done, the others keep the workers busy for seconds (with 4
    # parts a quiet machine could finish the whole build before the Ctrl-C landed)
    src = write_caption_folder(tmp_path / "pairs", 960)
    out = tmp_path / "idx"
    args = [sys.executable, "-m", "xm.cli", "build-index", "--source", str(src), "--out", str(out), "--coarse", TINY,
            "--fine", TINY, "--inference", TINY, "--shard-size", "60", "--batch-size", "8", "--num-workers", "2", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    deadline = time.time() + 180
    while not list((out / "_work" / "done" / "embed").glob("*.json")) and time.time() < deadline:
        workers |= _children(proc.pid)
        time.sleep(0.05)
    workers |= _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "xm: interrupted; re-run the same command to resume" in err and "Traceback" not in err, err
    assert workers, "no decoding worker was seen"
    time.sleep(0.5)
    alive = []
    for pid in workers:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            continue
    assert not alive, alive
    done = subprocess.run(args + ["--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["count"] == 960
