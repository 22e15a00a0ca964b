"""Inference precision (`--precision`): a typed value, parsed once where the user's text
comes in (a CLI command, `xm.Classifier`, the server's config, `BuildConfig.validate`).

Inner layers (method contexts, the encoder loader, retrieval, index extension) take a
`Precision` and never re-check it. The pattern for any option that crosses layers: an
enum (or frozen dataclass) beside the code that uses it, one `parse(text, flag)` giving
the one error line, called at each edge.
"""

from __future__ import annotations

from enum import Enum

from xm.errors import XMError


class Precision(str, Enum):
    """How an encoder's forward passes run. fp32 eager is the default and the reference;
    bf16 is open_clip's low-precision conversion under autocast; fp16 is fp16 autocast over
    the fp32 weights (on GPUs, its natural precision; on the CPU torch runs it too, slowly:
    it is accepted there so that an fp16 result can be checked without a GPU); int8 is torch's
    dynamic quantization of the nn.Linear layers, CPU only (measured in bench/bench_precision.py).

    A `str` (equal to, hashed and formatted as its name): manifests, cache keys and JSON
    carry the same text as before the type existed."""

    # lower-case member names: an Enum hashes by its name, and a member must hash as its text
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, text: str | Precision | None, flag: str = "--precision") -> Precision:
        """The precision `text` names (None: the default), or one line naming the choices."""
        if isinstance(text, Precision):
            return text
        value = DEFAULT_PRECISION.value if text is None else str(text).strip().lower()
        try:
            return cls(value)
        except ValueError:
            raise XMError(f"{flag} {text!r}: unknown precision; choose from {', '.join(PRECISIONS)}") from None


DEFAULT_PRECISION = Precision.fp32
PRECISIONS = tuple(p.value for p in Precision)
