"""The hyper-parameters of `Calibrator`, checked in one place (scikit-learn's habit: set in the
constructor or by `set_params`, checked again when `fit` starts, so that a value assigned to
an attribute afterwards cannot reach a saved calibrator that no longer loads).

The messages name the matching `blda calibrate` options (`--eps`, ...), which are the same
settings under the names users type."""

from __future__ import annotations

from blda_tools.errors import BLDAError, check_number

ESTIMATORS = ("gmm", "empirical")
# The constructor's parameters, in its order, with their defaults (`get_params`, `__repr__`).
DEFAULTS = {
    "estimator": "gmm",
    "n_components": 5,
    "eps": 0.01,
    "min_samples": 100,
    "table_points": 2048,
    "anchor": "global",
    "tau": 1.0,
}


def checked_parameters(estimator, n_components, eps, min_samples, table_points, anchor) -> dict:
    """The parameters as stored (ints and floats), or BLDAError naming the first bad one;
    `tau` is checked by `Calibrator.tau`'s setter, `anchor`'s class when fitting."""
    if estimator not in ESTIMATORS:
        raise BLDAError(f"--estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    for option, value, integer in (("--components", n_components, True), ("--eps", eps, False),
                                   ("--min-samples", min_samples, True),
                                   ("--table-points", table_points, True)):  # fmt: skip
        check_number(value, option, integer=integer)
    if n_components < 1:
        raise BLDAError(f"--components: expected a positive integer, got {n_components}")
    if not 0 < eps < 0.5:
        raise BLDAError(f"--eps: expected 0 < eps < 0.5, got {eps}")
    if min_samples < 1:
        raise BLDAError(f"--min-samples: expected a positive integer, got {min_samples}")
    if estimator == "gmm" and min_samples < n_components:  # a mixture needs K samples
        raise BLDAError(
            f"--components {n_components} and --min-samples {min_samples}: a mixture of "
            f"{n_components} components needs cells of at least as many logits; give "
            f"--min-samples >= {n_components} or fewer --components"
        )
    if table_points < 16:
        raise BLDAError(f"--table-points: expected an integer >= 16, got {table_points}")
    if not isinstance(anchor, str) or not (anchor == "global" or anchor.startswith("class:")):
        raise BLDAError(f"--anchor: expected 'global' or 'class:NAME', got {anchor!r}")
    return {
        "estimator": estimator,
        "n_components": int(n_components),
        "eps": float(eps),
        "min_samples": int(min_samples),
        "table_points": int(table_points),
        "anchor": anchor,
    }
