"""The hot path of Eq. 7 (Sec. 3.3.3): offsets by table interpolation, then log scores.

Eq. 7 is computed in log space as
    log score_c = -log sum_l exp(X_lc - X_cc),   X_lc = f[l] + tau Delta_cl(f[l]),
which needs no running maximum (the l = c term is exp(0) = 1, so the sum is >= 1); rows where a
term overflows are recomputed with a max-shifted logsumexp. X_lc - X_cc = (f[l] - f[c]) +
tau (Delta_cl - Delta_cc): both differences are computed once per block (`score_gaps`), so each
further tau of a sweep costs an add, a clamp, an exp and a sum over the (n, C, C) block. These
functions are TorchScript compatible: `blda export` scripts them, so `--apply` and the exported
module run the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Pixels per block in prediction: the (block, C, C) float32 temporaries are 1.5 MB each for
# C = 19; 1024 was the fastest of 256 to 16384 in benchmarks/bench_calibrate.py.
BLOCK_PIXELS = 1024


def gather_offsets(
    logits: Tensor, rows: Tensor, low: Tensor, inv_step: Tensor, high: Tensor, adjusted_lc: Tensor
) -> Tensor:
    """Offsets Delta_cl(f[l]) of every pixel, ``(n, C_l, C_c)``, by linear table interpolation.

    `rows` ``(C * G, 2 * C)``: row l * G + g holds Delta_{c, l} at grid point g of column l for all c,
    then the increment to point g + 1. `low`, `high`, `inv_step` ``(C,)`` describe each column's
    grid; `adjusted_lc` ``(C_l, C_c)`` is 1.0 where cell [c, l] has an offset, else 0.0.
    """
    n = logits.shape[0]
    num_classes = logits.shape[1]
    points = rows.shape[0] // num_classes
    position = ((logits - low) * inv_step).clamp_(0.0, float(points - 1))
    index = position.to(torch.int64)
    fraction = position - index
    index += torch.arange(num_classes, device=logits.device) * points  # column's first row
    pairs = rows.index_select(0, index.view(-1)).view(n, num_classes, 2, num_classes)
    offsets = torch.addcmul(pairs[:, :, 0], fraction.unsqueeze(2), pairs[:, :, 1])
    # Beyond the table z' is constant (clamped CDF), so Delta falls with slope -1 (Eq. 6).
    beyond = logits - torch.maximum(torch.minimum(logits, high), low)
    if bool((beyond != 0).any()):  # rare: one global test, rows only when needed
        outside = (beyond != 0).any(1).nonzero().squeeze(1)
        correction = beyond.index_select(0, outside).unsqueeze(2) * adjusted_lc
        offsets.index_add_(0, outside, -correction)
    return offsets


def score_gaps(logits: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The tau-independent parts of Eq. 7 for a block, both ``(n, C_l, C_c)``:
    f[l] - f[c] and Delta_cl(f[l]) - Delta_cc(f[c]). `offsets` is overwritten by the second."""
    logit_gap = logits.unsqueeze(2) - logits.unsqueeze(1)
    own = torch.diagonal(offsets, 0, 1, 2).clone()
    offsets -= own.unsqueeze(1)
    return logit_gap, offsets


def log_scores_from_gaps(logit_gap: Tensor, offset_gap: Tensor, tau: float, work: Tensor) -> Tensor:
    """Log Eq. 7 scores ``(n, C)`` at one tau; `work` is an ``(n, C, C)`` scratch tensor.

    log score_c = -log sum_l exp(X_lc - X_cc) with X_lc - X_cc = gap_f + tau gap_Delta: four
    passes over (n, C, C) per tau (add, clamp, exp, sum). The l = c term is 1, so the sum is >= 1 and
    needs no running maximum; rows where a term overflows are redone with logsumexp.
    """
    torch.add(logit_gap, offset_gap, alpha=tau, out=work)
    # exp of x < -87 gives float32 denormals, which cost ~60x a normal exp on x86; terms below
    # exp(-80) cannot change a sum that is >= 1 in float32, so clamping them is exact.
    work.clamp_(min=-80.0).exp_()
    log_scores = torch.log(work.sum(1)).neg_()
    if bool(torch.isinf(log_scores).any()):
        overflow = torch.isinf(log_scores).any(1).nonzero().squeeze(1)
        exponent = logit_gap.index_select(0, overflow) + tau * offset_gap.index_select(0, overflow)
        log_scores.index_copy_(0, overflow, torch.logsumexp(exponent, 1).neg_())
    return log_scores


def balanced_log_scores_blocks(
    logits: Tensor,
    rows: Tensor,
    low: Tensor,
    inv_step: Tensor,
    high: Tensor,
    adjusted_lc: Tensor,
    tau: float,
    block: int,
) -> Tensor:
    """Eq. 7 log scores ``(n, C)`` of `logits` ``(n, C)``, `block` pixels at a time."""
    if tau == 0.0:
        # No offset: log softmax, whose argmax is exactly the uncalibrated argmax.
        return torch.log_softmax(logits, 1)
    num_classes = logits.shape[1]
    result = torch.empty_like(logits)
    scratch = torch.empty(min(block, logits.shape[0]), num_classes, num_classes)
    for start in range(0, logits.shape[0], block):
        part = logits[start : start + block]
        offsets = gather_offsets(part, rows, low, inv_step, high, adjusted_lc)
        logit_gap, offset_gap = score_gaps(part, offsets)
        work = scratch[: part.shape[0]]
        result[start : start + block] = log_scores_from_gaps(logit_gap, offset_gap, tau, work)
    return result
