"""Post-hoc CDF alignment (paper Sec. 3.3.3, Eq. 6-7, Appendix A).

- `alignment`: the class and anchor distributions behind the offsets (Eq. 6): `Anchors`;
- `calibrator`: the fitted `Calibrator` (fit, predict, save, load) and its offset tables;
- `eq7/`: the Eq. 7 prediction, exact and pruned (design in `eq7/__init__.py`);
- `sweep`, `sweep_counts`: tau specs, the one-pass tau sweep with its baselines, tau selection;
- `apply`, `export`: `blda calibrate --apply` and `blda export`.

The `blda calibrate` job that strings these together is `blda_tools.calibrate.calibrate`.
"""

from __future__ import annotations

from blda_tools.calibration.alignment import Anchors
from blda_tools.calibration.calibrator import Calibrator

__all__ = ["Anchors", "Calibrator"]
