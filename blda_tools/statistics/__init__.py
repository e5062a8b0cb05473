"""Streaming, mergeable statistics of the logit-set matrix (paper Sec. 3.3.2, Eq. 3).

- `grid`: `LogitGrid`, the histogram grid shared by every cell;
- `logit_sets`: `LogitSetStatistics` (update / merge / derived quantities / save / load);
- `kernel`: the counting kernel behind `update` (how it is fast is explained there);
- `collect`: `collect_statistics` from a logit store, in this process or in workers;
- `io`: the HDF5 file format of saved statistics.
"""

from __future__ import annotations

from blda_tools.statistics.collect import LABEL_SOURCES, collect_statistics, resolve_label_source
from blda_tools.statistics.grid import LogitGrid, as_grid
from blda_tools.statistics.io import FORMAT_NAME, FORMAT_VERSION
from blda_tools.statistics.kernel import first_argmax
from blda_tools.statistics.logit_sets import LogitSetStatistics

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LABEL_SOURCES",
    "LogitGrid",
    "LogitSetStatistics",
    "as_grid",
    "collect_statistics",
    "first_argmax",
    "resolve_label_source",
]
