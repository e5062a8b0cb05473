"""Online BLDA for training (paper Sec. 3.3.4, Algorithm 1, Eq. 8-10).

- `loss`: `BLDALoss`, the logit-adjusted losses and the regression target (Eq. 8-10);
- `state`: the momentum-EM mixture sets per domain and their offset tables.
"""

from __future__ import annotations

from blda_tools.online.loss import BLDALoss

__all__ = ["BLDALoss"]
