"""The options of `BLDALoss`: their choices and ranges, each refused with a BLDAError naming the
argument."""

from __future__ import annotations

from blda_tools.errors import BLDAError, check_number

MODES = ("ola", "ola_source", "none")
DOMAINS = ("source", "target", "mixed")
REGRESSION_LOSSES = ("l2", "l1")
REDUCTIONS = ("mean", "sum", "none")
ANCHOR_SAMPLINGS = ("pixels", "class_balanced")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BLDAError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def check_options(options: dict) -> None:
    """BLDAError naming the first constructor argument out of range."""
    check_choice("mode", options["mode"], MODES)
    check_choice("regression_loss", options["regression_loss"], REGRESSION_LOSSES)
    check_choice("reduction", options["reduction"], REDUCTIONS)
    check_choice("anchor_sampling", options["anchor_sampling"], ANCHOR_SAMPLINGS)
    integers = ("num_classes", "n_components", "em_steps", "min_samples", "momentum_warmup",
                "anchor_grid_points", "offset_grid_points")  # fmt: skip
    for name in integers:
        check_number(options[name], name, integer=True)
    for name in ("max_samples_per_cell", "anchor_max_samples"):
        check_number(options[name], name, integer=True, optional=True)
    for name in ("momentum", "eps", "tau", "regression_weight"):
        check_number(options[name], name)
    components, minimum, cap = (
        options[k] for k in ("n_components", "min_samples", "max_samples_per_cell")
    )
    anchor_cap = options["anchor_max_samples"]
    problems = {
        "num_classes": ("an integer >= 2", int(options["num_classes"]) < 2),
        "n_components": ("an integer >= 1", int(components) < 1),
        "em_steps": ("an integer >= 0", int(options["em_steps"]) < 0),
        "min_samples": (f"an integer >= n_components={components}", int(minimum) < components),
        "max_samples_per_cell": (
            f"None or an integer >= min_samples={minimum}",
            cap is not None and int(cap) < int(minimum),
        ),
        "anchor_max_samples": (
            f"None or an integer >= min_samples={minimum}",
            anchor_cap is not None and int(anchor_cap) < int(minimum),
        ),
        "momentum": ("a number in [0, 1]", not 0.0 <= options["momentum"] <= 1.0),
        "momentum_warmup": ("an integer >= 0", int(options["momentum_warmup"]) < 0),
        "eps": ("a number in (0, 0.5)", not 0.0 < options["eps"] < 0.5),
        "tau": ("a number >= 0", not options["tau"] >= 0),
        "regression_weight": ("a number >= 0", not options["regression_weight"] >= 0),
        "anchor_grid_points": ("an integer >= 2", int(options["anchor_grid_points"]) < 2),
        "offset_grid_points": ("an integer >= 2", int(options["offset_grid_points"]) < 2),
    }
    for name, (expected, bad) in problems.items():
        if bad:
            raise BLDAError(f"{name}: expected {expected}, got {options[name]!r}")
