"""Maximum inner-product search (MIPS) with a bias: k*(q) = argmax_k <q, y_k> + b_k over fixed keys y (N, d).

The scores of a query batch (B, d) against the keys are computed one (query block x key block) tile at a time
into a buffer allocated once per search object, so no B x N matrix ever exists and repeated calls (the SD-FM
dual fit runs thousands) allocate nothing of size N. Everything runs on the keys' device, in float32 even under
autocast. Two strategies, chosen by device:

    one pass (CUDA):  per tile, torch.max gives the row maxima and their indices; a running (best, arg) keeps
                      the first tile that reached the maximum.
    two pass (CPU):   per tile, only the row maxima (torch.amax, about 10x faster than an indexed max on the CPU)
                      and the first key block that reached each query's maximum; then each query's argmax is
                      looked up again inside that one block, so the indexed reduction touches B x chunk scores
                      instead of B x N.

Both return the first maximising index, as torch.argmax does (up to ties within float32 rounding).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# keys per tile and scores per tile (query block = tile scores // chunk) by device type: on the CPU a 2 MiB tile
# that stays in cache with short rows; on GPUs a 256 MiB tile that keeps the device busy
CHUNK = {"cpu": 256, "cuda": 16384}
TILE_SCORES = {"cpu": 2 ** 19, "cuda": 2 ** 26}


class InnerProductSearch:
    """argmax_k <q_i, y_k> + b_k over fixed keys y (N, d), reusing its tile buffers across calls.

    `chunk`: keys per tile (0: `CHUNK` for the keys' device); `two_pass`: the CPU strategy (None: on the CPU
    only). Call with queries (B, d) and a bias (N,) that may change between calls.
    """

    def __init__(self, keys: Tensor, chunk: int = 0, two_pass: bool | None = None):
        if keys.dim() != 2 or keys.shape[0] == 0:
            raise ValueError(f"keys must be a non-empty (N, d) matrix, got shape {tuple(keys.shape)}")
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0: the device default), got {chunk}")
        kind = "cpu" if keys.device.type == "cpu" else "cuda"
        self.keys = keys.detach().float().contiguous()
        self.chunk = min(chunk or CHUNK[kind], self.keys.shape[0])
        self.query_block = max(1, TILE_SCORES[kind] // self.chunk)
        self.two_pass = kind == "cpu" if two_pass is None else two_pass
        self._tile = torch.empty(0, device=keys.device)  # grown to query_block x chunk on the first call
        self._values = torch.empty(0, device=keys.device)
        self._index = torch.empty(0, dtype=torch.long, device=keys.device)
        self._better = torch.empty(0, dtype=torch.bool, device=keys.device)

    @property
    def n(self) -> int:
        """Number of keys N."""
        return self.keys.shape[0]

    def _buffers(self, rows: int) -> None:
        """Allocate the tile buffers for query blocks of `rows` rows if they are smaller."""
        if self._values.numel() < rows:
            device = self.keys.device
            self._tile = torch.empty(rows * self.chunk, device=device)
            self._values = torch.empty(rows, device=device)
            self._index = torch.empty(rows, dtype=torch.long, device=device)
            self._better = torch.empty(rows, dtype=torch.bool, device=device)

    @torch.no_grad()
    def __call__(self, queries: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """max_k and argmax_k of <q_i, y_k> + b_k for queries (B, d), bias (N,): (B,) float32, (B,) int64."""
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise ValueError(f"queries must be (B, {self.keys.shape[1]}), got shape {tuple(queries.shape)}")
        if bias.shape != (self.n,):
            raise ValueError(f"bias must have shape ({self.n},), got {tuple(bias.shape)}")
        with torch.autocast(self.keys.device.type, enabled=False):
            queries = queries.to(self.keys.device, torch.float32)
            bias = bias.to(self.keys.device, torch.float32)
            best = torch.empty(queries.shape[0], device=self.keys.device)
            arg = torch.empty(queries.shape[0], dtype=torch.long, device=self.keys.device)
            rows = min(self.query_block, queries.shape[0])
            self._buffers(rows)
            scan = self._scan if self.two_pass else self._scan_indexed  # the two-pass scan leaves block numbers in arg
            for start in range(0, queries.shape[0], rows):
                stop = min(start + rows, queries.shape[0])
                scan(queries[start:stop], bias, best[start:stop], arg[start:stop])
            if self.two_pass:
                self._lookup(queries, bias, arg)
        return best, arg

    def _tiles(self, queries: Tensor, bias: Tensor):
        """Yield (block number, first key, scores (m, n)) for each key block, the scores in the tile buffer."""
        m = queries.shape[0]
        for j, k0 in enumerate(range(0, self.n, self.chunk)):
            n = min(self.chunk, self.n - k0)
            scores = self._tile[:m * n].view(m, n)
            torch.addmm(bias[k0:k0 + n], queries, self.keys[k0:k0 + n].T, out=scores)
            yield j, k0, scores

    def _scan_indexed(self, queries: Tensor, bias: Tensor, best: Tensor, arg: Tensor) -> None:
        """One pass: running row maxima `best` and their key indices `arg` for one query block."""
        m = queries.shape[0]
        values, index, better = self._values[:m], self._index[:m], self._better[:m]
        best.fill_(-math.inf)
        arg.zero_()
        for _, k0, scores in self._tiles(queries, bias):
            torch.max(scores, 1, out=(values, index))
            index.add_(k0)
            torch.gt(values, best, out=better)
            torch.maximum(best, values, out=best)
            torch.where(better, index, arg, out=arg)

    def _scan(self, queries: Tensor, bias: Tensor, best: Tensor, block: Tensor) -> None:
        """Pass one: row maxima `best` and, in `block`, the first key block that reached each of them."""
        m = queries.shape[0]
        values, better = self._values[:m], self._better[:m]
        best.fill_(-math.inf)
        block.zero_()
        for j, _, scores in self._tiles(queries, bias):
            torch.amax(scores, 1, out=values)
            torch.gt(values, best, out=better)
            torch.maximum(best, values, out=best)
            block.masked_fill_(better, j)

    def _lookup(self, queries: Tensor, bias: Tensor, arg: Tensor) -> None:
        """Pass two: replace each query's best block number in `arg` by its argmax key inside that block."""
        order = torch.argsort(arg)
        blocks, counts = torch.unique_consecutive(arg[order], return_counts=True)
        offset = 0
        for j, count in zip(blocks.tolist(), counts.tolist()):
            k0 = j * self.chunk
            n = min(self.chunk, self.n - k0)
            for s0 in range(offset, offset + count, self.query_block):
                rows = order[s0:min(s0 + self.query_block, offset + count)]
                scores = self._tile[:len(rows) * n].view(len(rows), n)
                torch.addmm(bias[k0:k0 + n], queries[rows], self.keys[k0:k0 + n].T, out=scores)
                arg[rows] = scores.argmax(1) + k0
            offset += count


def mips(queries: Tensor, keys: Tensor, bias: Tensor, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """max_k and argmax_k of <q_i, y_k> + b_k for queries (B, d), keys (N, d), bias (N,): (B,) float32, (B,) int64.

    A one-off `InnerProductSearch` (`chunk` keys per tile, 0: the device default); keep one to search the
    same keys repeatedly without reallocating its buffers.
    """
    return InnerProductSearch(keys, chunk)(queries, bias)
