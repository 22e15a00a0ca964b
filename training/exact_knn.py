"""Exact kNN on the chosen device: stored embeddings streamed in blocks, queries x block on the
device, a running top-k merged with `torch.topk` (RECO's neighbour tables, `--neighbours exact`).

The same code runs on cpu, cuda and mps (the CPU tests exercise it), in float32 (the stored
float16 rows are exact in it). The answer is exact and deterministic: ties are ordered by id,
lowest first, whatever the device or the block size, so two devices give the same ids.

Blocks of the stored embeddings stay on the device while they fit `budget` bytes (half the
free memory of a GPU, 1 GiB elsewhere): a table of millions of pairs reads the memory's parts
from disk once, not once per chunk of queries. Blocks beyond the budget are read again for
every chunk.

`--neighbours` (`Neighbours`, training/neighbours_option.py) chooses between this and the memory's own (approximate) index
search; `auto` takes the exact search on an accelerator and the index on the CPU, where an
exact search of a large memory costs far more than the index (bench/bench_device.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from xm.encoders.device import Device

CPU_BUDGET = 1 << 30
BLOCK_ROWS = {"cpu": 16384, "cuda": 65536, "mps": 32768}

# bad[i, j] for the queries against ids lo..hi-1 (a block), given the block's similarities
Exclude = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


class DeviceBlocks:
    """The rows 0..count-1 of an `Embeddings` (a memory's `embeddings(spec, modality)`) as float32
    blocks on `device`, read in id order; the first blocks that fit `budget` bytes are kept there."""

    def __init__(self, embeddings: Any, count: int, device: Device, rows: int | None = None,
                 budget: int | None = None) -> None:
        self.embeddings, self.count, self.device = embeddings, int(count), device
        self.rows = int(rows or BLOCK_ROWS.get(device.kind, 16384))
        if self.rows < 1:
            raise ValueError("block rows must be at least 1")
        self.budget = _budget(device) if budget is None else int(budget)
        self._kept: dict[int, torch.Tensor] = {}
        self._kept_bytes = 0
        self.reads = 0  # blocks read from the embeddings (the tests and the bench look)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        for lo in range(0, self.count, self.rows):
            yield lo, min(self.count, lo + self.rows), self.block(lo)

    def block(self, lo: int) -> torch.Tensor:
        """The block that starts at id `lo` (a multiple of `rows`), on the device."""
        block = self._kept.get(lo)
        if block is not None:
            return block
        hi = min(self.count, lo + self.rows)
        block = torch.from_numpy(np.ascontiguousarray(self.embeddings.gather(np.arange(lo, hi)), np.float32))
        block = block.to(self.device.torch, non_blocking=True)
        self.reads += 1
        size = block.numel() * block.element_size()
        if self._kept_bytes + size <= self.budget:
            self._kept[lo] = block
            self._kept_bytes += size
        return block


def _budget(device: Device) -> int:
    if device.kind == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device.torch))
        return int(free // 2)
    return CPU_BUDGET


class RunningTopK:
    """The k best (similarity, id) of each query row over blocks seen in increasing id order;
    ties ordered by id (lowest first). Excluded entries are -inf and come out as id -1."""

    def __init__(self, n: int, k: int, where: str) -> None:
        self.k = k
        self.sims = torch.full((n, k), -torch.inf, device=where)
        self.ids = torch.full((n, k), -1, dtype=torch.int64, device=where)

    def add(self, sims: torch.Tensor, lo: int) -> None:
        kk = min(self.k, sims.shape[1])
        vals, idx = torch.topk(sims, kk, dim=1)
        # topk picks arbitrarily among values tied at the k-th: rows where a tie crosses the cut
        # take the lowest ids by a stable sort (rare: identical stored embeddings)
        kth = vals[:, -1:]
        crossing = torch.isfinite(kth[:, 0]) & ((sims >= kth).sum(dim=1) > kk)
        if bool(crossing.any()):
            rows = torch.nonzero(crossing)[:, 0]
            s, order = torch.sort(sims[rows], dim=1, descending=True, stable=True)
            vals[rows], idx[rows] = s[:, :kk], order[:, :kk]
        ids = idx + lo
        by_id = torch.argsort(ids, dim=1)
        vals, ids = torch.gather(vals, 1, by_id), torch.gather(ids, 1, by_id)
        # earlier blocks hold lower ids and come first: a stable sort keeps equal similarities by id
        both_s, both_i = torch.cat([self.sims, vals], dim=1), torch.cat([self.ids, ids], dim=1)
        s, order = torch.sort(both_s, dim=1, descending=True, stable=True)
        self.sims, self.ids = s[:, : self.k], torch.gather(both_i, 1, order[:, : self.k])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        sims = self.sims.float().cpu().numpy()
        ids = self.ids.cpu().numpy()
        missing = ~np.isfinite(sims)
        ids[missing] = -1
        return sims, ids


def exact_knn(queries: np.ndarray, blocks: DeviceBlocks, k: int, exclude: Exclude | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The k largest inner products of each query row with every stored row (`blocks`), except
    where `exclude(lo, hi, sims)` says so: (similarities, ids), each (n, k), missing ids -1."""
    where = blocks.device.torch
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(where)
    top = RunningTopK(len(q), k, where)
    for lo, hi, block in blocks:
        sims = q @ block.T
        bad = exclude(lo, hi, sims) if exclude is not None else None
        if bad is not None:
            sims = sims.masked_fill(bad, -torch.inf)
        top.add(sims, lo)
    return top.result()
