"""What blda shows a person: the self-contained HTML report and its plain words.

- `html`: `Report`, a builder for one-file HTML reports (images embedded, text escaped), and
  the number formats every command shares (`format_value`: "n/a", never "-0.0");
- `explain`: what each column means, what the numbers say, and the next command to run.

The figures themselves come from `blda_tools.plots`.
"""

from __future__ import annotations

from blda_tools.report.html import Report

__all__ = ["Report"]
