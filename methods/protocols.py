"""Evaluation protocols: every switch that decides whether a result is comparable with a
published table, set at once by `--protocol` and recorded with each result.

`authors` is what produced the X-MoRe paper's tables (the authors' public code,
SeonghaEom/X-MoRe; METHODS.md section 1): one prompt everywhere, seeds 0-2, the pool
truncated to 128 then de-duplicated, raw-dot fine re-ranking, images with fewer than
128 neighbours skipped, every retrieved caption prefixed with the literal `a_photo_of_a `
before the inference encoder (their caption encoder tokenises `ctx_init + " " + caption`
with `--ctx_init a_photo_of_a`, underscores kept), and the stream in the order of their
seeded `DataLoader(shuffle=True)` (`evaluation/stream_order.py` says how it is replayed).
`xm` is this project's own: the first K distinct captions, cosine re-ranking, nothing
skipped, captions as stored, the dataset's templates, seeds 1-3, a numpy permutation.

Method options (the `method` part) apply to every method that has them; the ensemble
itself is the method's choice (`xmore` = L1, `xmore-minmax` = the paper's eqs. 2-3).
"""

from __future__ import annotations

from typing import Any

from xm.errors import XMError

PROTOCOLS: dict[str, dict[str, Any]] = {
    "authors": {
        "method": {"pool": "truncate-dedupe", "rerank": "dot", "skip_short": True, "overfetch": 200, "refetch": 1000,
                   "caption_prefix": "a_photo_of_a "},
        "stream_order": "torch-dataloader-shuffle",  # torch.manual_seed(seed), DataLoader(shuffle=True)
        "templates": "paper",  # "a photo of a {}." for every dataset
        "classnames": "coop",  # CoOp's names where xm ships them (a CoOp split file carries its own)
        "seeds": [0, 1, 2],
    },
    "xm": {
        "method": {"pool": "dedupe-truncate", "rerank": "cosine", "skip_short": False, "overfetch": 200, "refetch": 200,
                   "caption_prefix": ""},
        "stream_order": "numpy-permutation",  # np.random.default_rng(seed).permutation(n)
        "templates": None,  # the command's --templates
        "classnames": "clip_benchmark",
        "seeds": [1, 2, 3],
    },
}
DEFAULT_PROTOCOL = "authors"


def protocol(name: str) -> dict[str, Any]:
    if name not in PROTOCOLS:
        raise XMError(f"--protocol {name!r}: choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
