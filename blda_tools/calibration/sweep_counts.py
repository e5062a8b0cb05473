"""The confusion counts of a tau sweep, one compiled pass over a block of pixels.

For every pixel: the plain argmax (tau = 0, both methods), the Eq. 7 prediction at each further
tau (given: `predict_taus`), and the prior-adjusted argmax of f - tau log pi (Menon et al. 2020)
at each further tau, added to a ``(2, T, C, C)`` count table [method, tau, label, prediction].
One pass instead of, per tau, an add, an argmax and an index over the (C, n) block in torch.
"""

from __future__ import annotations

import math

from blda_tools.runtime.jit import kernel


@kernel
def count_sweep(logits, labels, predictions, taus, log_prior, cells) -> None:
    """Add the counts of `logits` ``(n, C)`` float32 with `labels` ``(n,)`` (in [0, C)) into
    `cells` ``(2, T, C, C)`` int64: method 0 ("blda") takes `predictions` ``(T - 1, n)`` at
    taus[1:], method 1 ("prior") argmax_c f[c] - tau log_prior[c] (float64; `log_prior` ``(C,)``
    may hold -inf for a class never seen), both the first index on ties; taus[0] is 0."""
    rows, num_classes = logits.shape
    for row in range(rows):
        label = labels[row]
        plain = 0
        for c in range(1, num_classes):
            plain = c if logits[row, c] > logits[row, plain] else plain
        cells[0, 0, label, plain] += 1
        cells[1, 0, label, plain] += 1
        for position in range(1, taus.shape[0]):
            cells[0, position, label, predictions[position - 1, row]] += 1
            tau, best, best_at = taus[position], -math.inf, 0
            for c in range(num_classes):
                value = float(logits[row, c]) - tau * log_prior[c]
                best_at = c if value > best else best_at
                best = max(best, value)
            cells[1, position, label, best_at] += 1
