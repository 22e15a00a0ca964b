"""Where encoders and models run (`--device`): a typed value, parsed once where the user's text
comes in (every CLI command that computes, `xm.Classifier`, `run_benchmark`, `BuildConfig.validate`,
the server's `Service`), following `encoders/precision.py`.

`auto` resolves here, once: CUDA if torch sees a GPU, else Apple's MPS, else the CPU. A device
that was asked for by name and that torch cannot use is one line (exit 2), never a silent
fall-back to the CPU. `cuda:0,1,2,3` names several GPUs of one machine: the build's embed stage
spreads its parts over them; every other command runs on the first.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from xm.errors import XMError

KINDS = ("cpu", "cuda", "mps")
CHOICES = "auto, cpu, cuda, cuda:N, cuda:N,M,... (several GPUs), mps"
_CUDA = re.compile(r"^cuda(?::(\d+(?:\s*,\s*(?:cuda:)?\d+)*))?$")


@dataclass(frozen=True)
class Device:
    """One kind of device and, for CUDA, which GPUs (`indices`; empty only for cpu and mps).

    `asked` is the text the user gave (`auto` stays visible in what is recorded: "auto -> cpu")."""

    kind: str = "cpu"
    indices: tuple[int, ...] = ()
    asked: str = field(default="cpu", compare=False)

    def __str__(self) -> str:
        if self.kind == "cuda":
            return "cuda:" + ",".join(str(i) for i in self.indices)
        return self.kind

    @property
    def torch(self) -> str:
        """The torch device string of the first (or only) device: `cuda:0`, `cpu`, `mps`."""
        return f"cuda:{self.indices[0]}" if self.kind == "cuda" else self.kind

    @property
    def all(self) -> tuple[str, ...]:
        """Every torch device string this value names (several only for a list of GPUs)."""
        return tuple(f"cuda:{i}" for i in self.indices) if self.kind == "cuda" else (self.kind,)

    @property
    def is_accelerator(self) -> bool:
        return self.kind != "cpu"

    def first(self) -> Device:
        """This device with only its first GPU (what the build's driver loads its encoders on)."""
        return self if len(self.indices) <= 1 else Device(self.kind, self.indices[:1], self.asked)

    def single(self, what: str, flag: str = "--device") -> Device:
        """This device, or one line if it names several GPUs where `what` runs on one."""
        if len(self.indices) > 1:
            raise XMError(f"{flag} {self}: {what} runs on one device; name one GPU (cuda:{self.indices[0]})")
        return self

    def describe(self) -> str:
        """What ran where, once per command: `cuda:0 (NVIDIA H100 80GB HBM3)`, `cpu (2 threads)`;
        `auto -> ...` when auto chose it."""
        import torch

        if self.kind == "cuda":
            names = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in self.indices]
            where = ", ".join(names)
        elif self.kind == "mps":
            where = "mps (Apple GPU)"
        else:
            where = f"cpu ({torch.get_num_threads()} threads)"
        return f"auto -> {where}" if self.asked == "auto" else where

    @classmethod
    def parse(cls, text: str | Device | None, flag: str = "--device", check: bool = True) -> Device:
        """The device `text` names (None: auto), or one line naming the flag and the problem.

        `check` (the default) also refuses a device torch cannot use here; only a Spark
        driver, whose executors hold the GPUs, parses without it."""
        if isinstance(text, Device):
            return text.checked(flag) if check else text
        asked = "auto" if text is None else str(text).strip().lower().replace(" ", "")
        if asked == "auto":
            return _resolve_auto()
        if asked in ("cpu", "mps"):
            device = cls(asked, (), asked)
        elif (m := _CUDA.match(asked)) is not None:
            indices = tuple(int(i.removeprefix("cuda:")) for i in m.group(1).split(",")) if m.group(1) else (0,)
            if len(set(indices)) != len(indices):
                raise XMError(f"{flag} {text!r}: a GPU is named twice")
            device = cls("cuda", indices, asked)
        else:
            raise XMError(f"{flag} {text!r}: unknown device; choose from {CHOICES}")
        return device.checked(flag) if check else device

    def checked(self, flag: str = "--device") -> Device:
        """This device if torch can use it here, else one line (never a fall-back to the CPU)."""
        if self.kind == "cpu":
            return self  # always usable: no need to import torch to know
        import torch

        if self.kind == "cuda":
            if not torch.cuda.is_available():
                build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
                raise XMError(f"{flag} {self.asked}: torch sees no CUDA GPU here ({build}); use --device cpu or auto")
            count = torch.cuda.device_count()
            missing = [i for i in self.indices if i >= count]
            if missing:
                raise XMError(f"{flag} {self.asked}: this machine has {count} CUDA GPU(s) (cuda:0..{count - 1}); "
                              f"cuda:{missing[0]} is not one of them")
        if self.kind == "mps" and not _mps_available():
            raise XMError(f"{flag} {self.asked}: torch sees no Apple MPS device here; use --device cpu or auto")
        return self

    def sync(self) -> None:
        """Wait for the device's queued work (timings measure work, not its launch)."""
        import torch

        if self.kind == "cuda":
            for i in self.indices:
                torch.cuda.synchronize(i)
        elif self.kind == "mps":
            torch.mps.synchronize()


@contextlib.contextmanager
def out_of_memory(device: str, what: str = "--batch-size") -> Iterator[None]:
    """Turn `device` (a torch device string) running out of memory into one line naming `what`,
    the option that sets how much memory a step takes."""
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc):
            raise XMError(f"{device}: out of memory ({_first_line(exc)}); lower {what} or choose another --device") from exc
        raise


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device running out of memory (CUDA's OutOfMemoryError, MPS' RuntimeError)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _mps_available() -> bool:
    import torch

    mps: Any = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


# Device nodes without one of which no CUDA (or ROCm) device can be open on Linux: NVIDIA's
# driver, AMD's kernel driver, WSL2's GPU paravirtualisation.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _no_gpu_possible() -> bool:
    """True where no GPU can be seen, known without importing torch (2-3 s): Linux with none of
    `_GPU_NODES`. `auto` then resolves to the CPU at once, so an option refused after it stays a
    fast one-line error; anywhere else torch is asked."""
    import os

    return sys.platform.startswith("linux") and not any(os.path.exists(n) for n in _GPU_NODES)


def _resolve_auto() -> Device:
    if _no_gpu_possible():
        return Device("cpu", (), "auto")
    import torch

    if torch.cuda.is_available():
        return Device("cuda", (0,), "auto")
    if _mps_available():
        return Device("mps", (), "auto")
    return Device("cpu", (), "auto")


CPU = Device("cpu", (), "cpu")

_announcement: list[Callable[[], str]] = []  # the command's "what runs where" line, until the first encoder loads
_announcement_lock = threading.Lock()


def announce_when_used(line: Callable[[], str]) -> None:
    """Say `line()` (a command's device, once) on stderr when the first encoder is loaded: work has
    begun then, every option is validated, so a bad option elsewhere stays one line (and made
    then, the line costs no torch import to a command that stops before)."""
    with _announcement_lock:
        _announcement[:] = [line]


def announce() -> None:
    """Print the pending device line, if any (called by `load_encoder`)."""
    with _announcement_lock:
        lines, _announcement[:] = list(_announcement), []
    for line in lines:
        print(line(), file=sys.stderr, flush=True)
