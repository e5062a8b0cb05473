"""The counting kernel behind `LogitSetStatistics.update`: one sub-chunk of rows in, its statistics out.

How it is fast (the hot path of `blda diagnose`, about 20 values per pixel):

* Layout. Rows arrive as ``(n, C)`` logits, float16 or float32. Blocks of `BLOCK_ROWS` rows, small
  enough to stay in cache through every pass, are transposed once into a float32 ``(C, r)`` block,
  so that the per-class work below runs along contiguous memory. The float16 -> float32 step
  happens here, in cache, instead of on the whole chunk in memory.
* Histograms (Eq. 3). The flat histogram index of logit ``(i, l)`` is ``label_i * B + bin``,
  written into a ``(C, n)`` int32 table: one row per logit class l. Each row then goes through its
  own `torch.bincount`, which touches only that class's ``(C + 1) * B`` counters (640 kB for
  B = 4000) and so stays in cache; one bincount over all ``C * C * B`` counters (12 MB) would
  miss cache on nearly every count.
* Sums and sums of squares by label: one matrix product of ``[x; x * x]`` ``(2C, r)`` with the
  one-hot labels ``(r, C + 1)``, in float32 within a block, added in float64 across blocks
  (relative error ~1e-7, not growing with the number of rows).
* Confusion. The argmax of a row is a reduction over the first axis of the ``(C, r)`` block,
  which vectorises across rows: the row maximum, then the first class that reaches it.
* Exact minimum and maximum per cell. A value can only lower a cell's running minimum if its bin
  is at or below the bin of that minimum (likewise for the maximum), so only logits in such bins
  are looked at: the counts tell which classes have any, then one gather from a boolean table of
  candidate bins per such class finds them, and `scatter_reduce` reduces the few hits. A cell
  with no value yet uses the sub-chunk's own first and last occupied bins. Occupied edge bins are
  always candidates, which also counts the values outside the grid exactly.

Row C of every ``(C + 1)``-row table is the discard row: ignored pixels are mapped to label C by
the caller and their contributions are dropped at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blda_tools.errors import BLDAError
from blda_tools.statistics.grid import LogitGrid

# 8192 rows x 19 classes x 4 bytes = 0.6 MB per float32 block: the handful of blocks a pass
# touches fit in L2 (measured 4096-16384 alike; smaller blocks pay more Python per row).
BLOCK_ROWS = 8192


@dataclass
class PartialStatistics:
    """What one sub-chunk contributes. Tables are indexed ``[l, c]``: logit class first, then
    the given class c, which includes the discard row C."""

    counts: torch.Tensor  # (C, C + 1, B) int64
    moments: torch.Tensor  # (2C, C + 1) float64: sums in [:C], sums of squares in [C:]
    confusion: torch.Tensor  # (C, C) int64, [true, argmax]
    minimum: torch.Tensor  # (C, C + 1) float64, +inf where no candidate was seen
    maximum: torch.Tensor  # (C, C + 1) float64, -inf likewise
    clipped: torch.Tensor  # (C, C + 1) int64, values outside the grid


class Workspace:
    """Buffers of one thread's kernel calls, kept between updates so that no fresh memory has to
    be faulted in for every sub-chunk (that alone cost ~10% of the kernel)."""

    def __init__(self, num_classes: int) -> None:
        C = num_classes
        self.num_classes = C
        self.identity = torch.eye(C + 1)  # rows of the one-hot labels
        # Class l scores C - l where it reaches the row maximum: the highest score is the
        # first maximal class, as numpy's argmax returns.
        score_dtype = torch.uint8 if C < 256 else torch.int32
        self.first_class_score = torch.arange(C, 0, -1, dtype=score_dtype)[:, None]
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape`, reusing (a prefix of) the memory of earlier calls."""
        size = 1
        for extent in shape:
            size *= extent
        stored = self._buffers.get(name)
        if stored is None or stored.dtype != dtype or stored.numel() < size:
            stored = self._buffers[name] = torch.empty(size, dtype=dtype)
        return stored[:size].view(shape)


def running_extreme_bins(
    grid: LogitGrid, minimum: torch.Tensor, maximum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins of the running `minimum` / `maximum` ``(C, C)`` ``[c, l]``, as ``(C, C + 1)`` int64
    tables ``[l, c]``: B and -1 for cells with no value yet, -1 and B for the discard row C (so
    that it never has candidates)."""
    C, B = minimum.shape[0], grid.bins
    low_bin = torch.full((C, C + 1), -1, dtype=torch.int64)
    high_bin = torch.full((C, C + 1), B, dtype=torch.int64)
    low_bin[:, :C] = torch.where(minimum.isinf(), B, grid.bin_index(minimum.clamp(-3e38, 3e38))).T
    high_bin[:, :C] = torch.where(maximum.isinf(), -1, grid.bin_index(maximum.clamp(-3e38, 3e38))).T
    return low_bin, high_bin


def count_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grid: LogitGrid,
    running_bins: tuple[torch.Tensor, torch.Tensor],
    workspace: Workspace,
) -> PartialStatistics:
    """Every statistic of `logits` ``(n, C)`` (float16/float32) with `labels` ``(n,)`` int64 in
    ``[0, C]`` (C = ignored); `running_bins` from `running_extreme_bins`. `BLDAError` on NaN/Inf.
    """
    n, C = logits.shape
    B = grid.bins
    index = workspace.buffer("index", (C, n), torch.int32)
    pairs = workspace.buffer("pairs", (n,), torch.int64)
    moments = torch.zeros(2 * C, C + 1, dtype=torch.float64)
    label_offset = (labels * B).to(torch.int32)
    # Confusion cell of a row: label * C + argmax, and argmax = C - score (see Workspace).
    confusion_base = labels * C + C
    for start in range(0, n, BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        block, bins = _count_block(logits[rows], labels[rows], grid, workspace, moments)
        torch.add(bins, label_offset[rows], out=index[:, rows])
        torch.sub(confusion_base[rows], _first_argmax_score(block, workspace), out=pairs[rows])
    # A NaN or Inf makes the sums non-finite; it must be caught before a garbage bin is counted.
    if not torch.isfinite(moments).all():
        raise BLDAError("logits: contain NaN or infinite values")
    confusion = torch.bincount(pairs, minlength=(C + 1) * C)[: C * C].view(C, C)
    extremes = _Extremes(C, n, workspace)
    counts = []
    for column in range(C):  # one class at a time: its index row is still in cache for the search
        column_counts = torch.bincount(index[column], minlength=(C + 1) * B).view(C + 1, B)
        low_bin, high_bin = (table[column] for table in running_bins)
        candidates = _candidate_bins(column_counts, low_bin, high_bin)
        if candidates.any():
            extremes.search(column, logits, index[column], candidates.view(-1), grid)
        counts.append(column_counts)
    counts = torch.stack(counts)
    return PartialStatistics(
        counts, moments, confusion, extremes.minimum, extremes.maximum, extremes.clipped
    )


def _count_block(
    values: torch.Tensor,
    labels: torch.Tensor,
    grid: LogitGrid,
    workspace: Workspace,
    moments: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds one block's moments into `moments`; returns the block as float32 ``(C, r)`` and its
    bins as int32 ``(C, r)`` (workspace buffers, valid until the next block)."""
    r, C = values.shape
    stacked = workspace.buffer("stacked", (2 * C, r), torch.float32)
    block = stacked[:C]
    block.copy_(values.T)  # transposed and converted to float32 in one pass
    torch.mul(block, block, out=stacked[C:])
    one_hot = workspace.buffer("one_hot", (r, C + 1), torch.float32)
    torch.index_select(workspace.identity, 0, labels, out=one_hot)
    # [sum; sum of squares] by label, float32 within the block, float64 across blocks.
    moments += torch.mm(stacked, one_hot).to(torch.float64)
    bin_units = grid.to_bin_units(block, out=workspace.buffer("bin_units", (C, r), torch.float32))
    bins = workspace.buffer("bins", (C, r), torch.int32)
    bins.copy_(bin_units)  # float -> int truncates, = floor for values >= 0
    return block, bins


def _first_argmax_score(block: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """``C - argmax`` of every column of `block` ``(C, r)``: the first maximal class of each row."""
    C, r = block.shape
    reaches_max = torch.eq(
        block, block.amax(0), out=workspace.buffer("reaches_max", (C, r), torch.bool)
    )
    scores = workspace.buffer("scores", (C, r), workspace.first_class_score.dtype)
    return torch.mul(reaches_max, workspace.first_class_score, out=scores).amax(0)


def _candidate_bins(
    counts: torch.Tensor, low_bin: torch.Tensor, high_bin: torch.Tensor
) -> torch.Tensor:
    """Boolean ``(C + 1, B)`` table ``[c, bin]`` of one logit class l's occupied bins whose values
    may change cell ``[c, l]``'s running extremes (bins at or beyond those of the running
    minimum / maximum), plus its occupied edge bins (to count values outside the grid).

    A cell with no running value takes this sub-chunk's own first and last occupied bins.
    """
    C, B = counts.shape[0] - 1, counts.shape[1]
    occupied = counts > 0
    new_cells = low_bin == B
    if new_cells.any():
        present = occupied.view(torch.uint8)
        low_bin = torch.where(new_cells, present.argmax(1), low_bin)
        high_bin = torch.where(new_cells, B - 1 - present.flip(1).argmax(1), high_bin)
    bins = torch.arange(B)
    beyond = (bins <= low_bin[:, None]) | (bins >= high_bin[:, None])
    beyond[:C, 0] = True
    beyond[:C, B - 1] = True
    return beyond.logical_and_(occupied)


class _Extremes:
    """Minimum, maximum and number of values outside the grid of the candidate logits, as
    ``(C, C + 1)`` tables ``[l, c]``: exact for every cell whose extremes may change."""

    def __init__(self, num_classes: int, rows: int, workspace: Workspace) -> None:
        C = num_classes
        self.minimum = torch.full((C, C + 1), torch.inf, dtype=torch.float64)
        self.maximum = torch.full((C, C + 1), -torch.inf, dtype=torch.float64)
        self.clipped = torch.zeros(C, C + 1, dtype=torch.int64)
        # The hit mask is padded to whole 8-byte words, so that the few hits are found by
        # scanning rows / 8 words instead of rows bytes (`nonzero` over bytes cost as much as the
        # gather).
        self.rows = rows
        self.is_hit = workspace.buffer("is_hit", (-(-rows // 8) * 8,), torch.bool)
        self.is_hit[rows:] = False
        self.byte_in_word = torch.arange(8)

    def search(
        self,
        column: int,
        logits: torch.Tensor,
        index: torch.Tensor,
        candidates: torch.Tensor,
        grid: LogitGrid,
    ) -> None:
        """Take in the logits of class `column` whose flat bin `index` (``c * B + bin``) is a
        candidate (`candidates` ``((C + 1) * B,)`` bool)."""
        torch.index_select(candidates, 0, index, out=self.is_hit[: self.rows])
        words = self.is_hit.view(torch.int64).nonzero().squeeze(1)
        rows = (words[:, None] * 8 + self.byte_in_word).view(-1)
        rows = rows[self.is_hit[rows]]
        values = logits[rows, column].to(torch.float64)
        cells = index[rows].to(torch.int64) // grid.bins  # the given class c
        self.minimum[column].scatter_reduce_(0, cells, values, "amin")
        self.maximum[column].scatter_reduce_(0, cells, values, "amax")
        outside = (values < grid.low) | (values > grid.high)
        self.clipped[column] += torch.bincount(cells[outside], minlength=self.clipped.shape[1])


def first_argmax(logits: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """Index of the first maximal value of every row of `logits` ``(n, C)``, int64, like
    ``numpy.argmax(axis=1)`` (and `max(1).indices`), in cache-sized transposed blocks."""
    n, C = logits.shape
    workspace = workspace if workspace is not None else Workspace(C)
    result = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        values = logits[rows]
        block = workspace.buffer("stacked", (C, values.shape[0]), torch.float32)
        block.copy_(values.T)
        result[rows] = C - _first_argmax_score(block, workspace)
    return result
