"""The counting kernel behind `LogitSetStatistics.update`, compiled with numba.

Why compiled: every statistic of a cell ``[c, l]`` (histogram bin, sum, sum of squares, minimum,
maximum, values outside the grid) is a few operations on one value, about 20 values per pixel. As
whole-array torch operations that took ~8 passes over the chunk (~160 CPU-ms per million pixels);
one compiled pass over each row does it all while the row is in cache (~60 CPU-ms).

Two passes over a chunk of rows ``(n, C)``:

1. `scan_rows` checks every value and label and writes each row's given class (its label, -1 when
   ignored, or its argmax for pseudo-labels). It runs before anything is counted, so a bad chunk
   leaves the statistics untouched.
2. `count_rows` adds the rows into the tables. Each thread owns a set of given classes and counts
   only rows of those classes: threads write disjoint cells, need no private copies of the
   (C, C, B) histogram, and every cell sees its rows in the same order whatever the number of
   threads, so the float64 sums are the same bit for bit.

float16 logits are read as their bit patterns through a 65,536-entry float32 table (numba has no
float16 arithmetic); the value is exact either way. A bin is ``int(clamp(z * scale + shift, 0,
B - 1))`` in float32, the arithmetic of `LogitGrid.bin_index`, so both agree bit for bit.
For float16 `count_rows` looks up each bit pattern's bin and float64 value in two more tables
(`bin_table`, made per grid with that same float32 arithmetic, and `FLOAT16_EXACT`) instead of
computing them: 30M pixels of C = 19 took ~20 % less time (`benchmarks/bench_diagnose.py`).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba.extending import overload

from blda_tools.runtime.arrays import as_numpy
from blda_tools.runtime.jit import kernel

# Every float16 bit pattern's float32 value.
FLOAT16_VALUES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
FLOAT16_VALUES = FLOAT16_VALUES.astype(np.float32)
with np.errstate(invalid="ignore"):  # signalling NaN patterns stay NaN
    FLOAT16_EXACT = FLOAT16_VALUES.astype(np.float64)

# `scan_rows` status codes.
ROWS_OK, BAD_LABEL, NOT_FINITE = 0, 1, 2


def read_value(values, row, column, table):
    """Logit ``[row, column]``: float16 stored as uint16 bit patterns are looked up in `table`."""
    if values.dtype == np.uint16:
        return table[values[row, column]]
    return values[row, column]


# The compiled `read_value`, specialised on the dtype when a kernel is compiled (a plain global,
# so the kernels stay cacheable on disk).
@overload(read_value, inline="always")
def _compiled_read_value(values, row, column, table):
    if values.dtype == numba.types.uint16:
        return lambda values, row, column, table: table[values[row, column]]
    return lambda values, row, column, table: values[row, column]


def value_is_finite(values, row, column):
    """Whether logit ``[row, column]`` is finite (float16: its exponent bits are not all set)."""
    if values.dtype == np.uint16:
        return (values[row, column] & 0x7C00) != 0x7C00
    return np.isfinite(values[row, column])


@overload(value_is_finite, inline="always")
def _compiled_value_is_finite(values, row, column):
    if values.dtype == numba.types.uint16:
        return lambda values, row, column: (values[row, column] & 0x7C00) != 0x7C00
    return lambda values, row, column: np.isfinite(values[row, column])


@functools.lru_cache(maxsize=8)
def bin_table(scale: np.float32, shift: np.float32, bins: int) -> np.ndarray:
    """Every float16 bit pattern's histogram bin ``int(clamp(z * scale + shift, 0, bins - 1))``,
    int32, computed in float32 as `count_rows` computes it for float32 logits (NaN: bin 0, never
    counted: `scan_rows` rejects non-finite rows first)."""
    with np.errstate(invalid="ignore"):
        position = FLOAT16_VALUES * np.float32(scale) + np.float32(shift)
        position = np.minimum(np.maximum(position, np.float32(0.0)), np.float32(bins - 1))
        table = np.where(np.isnan(position), 0, position).astype(np.int32)
    table.flags.writeable = False  # shared by every caller of this grid
    return table


def _value_and_bin(values, row, column, table, bins, scale, shift, top_bin):
    """Logit ``[row, column]`` as float64 and its histogram bin (see `_compiled_value_and_bin`)."""
    if values.dtype == np.uint16:
        bits = values[row, column]
        return table[bits], bins[bits]
    value = values[row, column]
    position = min(max(value * scale + shift, np.float32(0.0)), top_bin)
    return np.float64(value), np.int64(position)


@overload(_value_and_bin, inline="always")
def _compiled_value_and_bin(values, row, column, table, bins, scale, shift, top_bin):
    if values.dtype == numba.types.uint16:
        # float16: both looked up by bit pattern (`table` holds the exact float64 values).
        def from_tables(values, row, column, table, bins, scale, shift, top_bin):
            bits = values[row, column]
            return table[bits], np.int64(bins[bits])

        return from_tables

    def computed(values, row, column, table, bins, scale, shift, top_bin):
        value = values[row, column]
        position = value * scale + shift  # float32, as LogitGrid.bin_index
        position = min(max(position, np.float32(0.0)), top_bin)
        return np.float64(value), np.int64(position)

    return computed


def value_reader(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, table)`` for the kernels: float16 as uint16 bit patterns with the value table,
    float32 as it is (the table unused)."""
    if values.dtype == np.float16:
        return values.view(np.uint16), FLOAT16_VALUES
    if values.dtype == np.float32:
        return values, FLOAT16_VALUES[:0]
    raise TypeError(f"kernel: float16 or float32 logits expected, got {values.dtype}")


@numba.njit(inline="always")
def _row_argmax(values, row, table):
    """The first maximal class of `row` (numpy's argmax; -0.0 ties with 0.0)."""
    best_class = 0
    best = read_value(values, row, 0, table)
    for column in range(1, values.shape[1]):
        value = read_value(values, row, column, table)
        if value > best:
            best, best_class = value, column
    return best_class


@kernel
def scan_rows(values, table, labels, pseudo, ignore_index, start, stop, given):
    """Rows ``[start, stop)``: fill `given` with each row's label (-1 if ignored), or with its
    argmax when `pseudo`. Returns ``(status, row)``: ``(ROWS_OK, -1)`` or the first bad row with
    `BAD_LABEL` / `NOT_FINITE`."""
    num_classes = values.shape[1]
    for row in range(start, stop):
        finite = True
        for column in range(num_classes):
            finite &= value_is_finite(values, row, column)
        if not finite:
            return NOT_FINITE, row
        if pseudo:
            given[row] = _row_argmax(values, row, table)
            continue
        label = labels[row]
        if label == ignore_index:
            given[row] = -1
        elif label < 0 or label >= num_classes:
            return BAD_LABEL, row
        else:
            given[row] = label
    return ROWS_OK, -1


@kernel
def count_rows(
    values, exact, bins, given, owned, scale, shift, low, high,
    histogram, sums, sum_squares, minimum, maximum, clipped, confusion,
):  # fmt: skip
    """Add every row whose given class c has ``owned[c]`` into the ``[c, l]`` cells of the
    tables (indexed like `LogitSetStatistics`' fields) and into row c of `confusion`.
    float16 `values` (bit patterns) are read through `exact` (`FLOAT16_EXACT`) and `bins`
    (`bin_table` of the grid); float32 ones ignore both.

    The small (C, C) tables are accumulated in this call's own copies and added at the end:
    written on every value, the shared ones would bounce cache lines between the threads
    (measured: two threads slower than one)."""
    num_classes = values.shape[1]
    top_bin = np.float32(histogram.shape[2] - 1)
    chunk_sums = np.zeros_like(sums)
    chunk_squares = np.zeros_like(sum_squares)
    chunk_minimum = np.full_like(minimum, np.inf)
    chunk_maximum = np.full_like(maximum, -np.inf)
    chunk_clipped = np.zeros_like(clipped)
    chunk_confusion = np.zeros_like(confusion)
    for row in range(values.shape[0]):
        c = given[row]
        if c < 0 or not owned[c]:
            continue
        best_class = 0
        best = -np.inf
        for column in range(num_classes):
            value, position = _value_and_bin(
                values, row, column, exact, bins, scale, shift, top_bin
            )
            if value > best or column == 0:  # the first maximal class, for the confusion matrix
                best, best_class = value, column
            histogram[c, column, position] += 1
            chunk_sums[c, column] += value
            chunk_squares[c, column] += value * value
            chunk_minimum[c, column] = min(chunk_minimum[c, column], value)
            chunk_maximum[c, column] = max(chunk_maximum[c, column], value)
            if value < low or value > high:
                chunk_clipped[c, column] += 1
        chunk_confusion[c, best_class] += 1
    for c in range(num_classes):
        if not owned[c]:
            continue
        for column in range(num_classes):
            sums[c, column] += chunk_sums[c, column]
            sum_squares[c, column] += chunk_squares[c, column]
            minimum[c, column] = min(minimum[c, column], chunk_minimum[c, column])
            maximum[c, column] = max(maximum[c, column], chunk_maximum[c, column])
            clipped[c, column] += chunk_clipped[c, column]
            confusion[c, column] += chunk_confusion[c, column]


@kernel
def argmax_rows(values, table, out):
    """`out[row]` = the first maximal class of each row (NaN rows are not expected)."""
    for row in range(values.shape[0]):
        out[row] = _row_argmax(values, row, table)


def first_argmax(logits) -> np.ndarray:
    """Index of the first maximal value of every row of `logits` ``(n, C)`` (numpy array or
    torch tensor), int64, like ``numpy.argmax(axis=1)`` (ties go to the lowest class; -0.0 ties
    with 0.0)."""
    logits = as_numpy(logits)
    dtype = logits.dtype if logits.dtype in (np.float16, np.float32) else np.float32
    values, table = value_reader(np.ascontiguousarray(logits, dtype=dtype))
    out = np.empty(values.shape[0], dtype=np.int64)
    argmax_rows(values, table, out)
    return out
