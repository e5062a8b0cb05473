"""SynthCity, the synthetic street-scene domain shift the project generates.

- `generate`: `make_synthcity`, the on-disk layouts (GTA5-like source, Cityscapes-like target);
- `scenes`: scene layouts drawn per image;
- `render`: appearance, and the class-dependent drift of the target (`TARGET_DRIFT`).
"""

from __future__ import annotations

from blda_tools.datasets.synthcity.generate import (
    CLASS_NAMES,
    DOMAINS,
    GENERATOR_VERSION,
    SOURCE,
    TARGET,
    TARGET_DRIFT,
    SynthCityInfo,
    make_synthcity,
    split_counts,
)

__all__ = [
    "CLASS_NAMES",
    "DOMAINS",
    "GENERATOR_VERSION",
    "SOURCE",
    "TARGET",
    "TARGET_DRIFT",
    "SynthCityInfo",
    "make_synthcity",
    "split_counts",
]
