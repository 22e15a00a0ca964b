"""`--device`, the same on every command that computes: the help text and the edge's one parse."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command modules load at every `xm` start: torch only when a command runs
    from xm.encoders.device import Device

DEVICE_HELP = ("where encoders and models run: auto (cuda if torch sees a GPU, else mps, else cpu) | cpu | cuda | "
               "cuda:N | mps; a device asked for and not usable here is an error, never a CPU fall-back")
BUILD_DEVICE_HELP = DEVICE_HELP + "; build-index also takes several GPUs, cuda:0,1,2,3 (embed parts spread over them)"


def parse_device(text: str, command: str, several: bool = False) -> Device:
    """The command's device, parsed once before any work (one line for a bad or unusable value),
    and said once on stderr (when the first encoder loads): what runs where."""
    from xm.encoders.device import Device, announce_when_used

    device = Device.parse(text)
    if not several:
        device.single(f"xm {command}")
    # said when the first encoder loads, not now: an option refused after this one stays one line
    announce_when_used(lambda: f"xm {command}: device {device.describe()}")
    return device
