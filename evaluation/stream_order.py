"""The order in which a benchmark's test images reach a stream method (X-MoRe's L1 and
min-max weightings depend on it), one per protocol, recorded with each result.

`numpy-permutation` (xm's protocol): `np.random.default_rng(seed).permutation(n)`.

`torch-dataloader-shuffle` (the authors' protocol): the X-MoRe authors' script calls
`torch.manual_seed(seed)` (with `random` and numpy, their `set_random_seed`) and iterates a
`torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=True)`. Iterating such a loader,
torch (1.x and 2.x alike) draws from the global CPU generator, in this order:
  1. the loader iterator's `_base_seed` (one int64 draw, for worker seeding),
  2. the `RandomSampler`'s seed (one int64 draw), which seeds a fresh `torch.Generator`,
  3. `torch.randperm(n, generator=that generator)`: image `order[t]` is decided at step t.
This module replays those draws on a private generator seeded with `seed`, so the global
torch state is left alone. What it cannot replay: between their `manual_seed` and the loader,
their script builds its CLIP model (twice, `load` and `reset_classnames`), whose parameter
initialisation also draws from the global generator, a number of draws that depends on the
architecture, their CLIP code and the torch version. The order is therefore their shuffle's
algorithm from their seeds, not a bit-identical copy of the order of their runs (which
nobody can have without their exact environment); it affects the results only through the
stream's weighting history.
"""

from __future__ import annotations

import numpy as np

from xm.errors import XMError

STREAM_ORDERS = ("numpy-permutation", "torch-dataloader-shuffle")


def stream_order(n: int, seed: int, kind: str) -> np.ndarray:
    """The positions' image indices: image `order[t]` is the t-th of the stream."""
    if kind == "numpy-permutation":
        return np.random.default_rng(seed).permutation(n)
    if kind == "torch-dataloader-shuffle":
        import torch  # only the authors' order needs it

        g = torch.Generator().manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader iterator's _base_seed
        sampler_seed = int(torch.empty((), dtype=torch.int64).random_(generator=g).item())
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(sampler_seed))
        return perm.numpy().astype(np.int64)
    raise XMError(f"stream order {kind!r}: choose from {', '.join(STREAM_ORDERS)}")
