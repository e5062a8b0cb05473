"""Running a model over a dataset, and the `blda dump-logits` job.

- `predict`: whole-image and sliding-window inference, device choice (`predict_logits`,
  `predict_images` for uint8 images resized as mmcv does, `predict_classes` for classifiers);
- `protocols`: each model family's test protocol, the default of a dump; `resize`: mmcv's
  keep-ratio sizes and OpenCV resize of uint8 images; `tasks`: segmentation or classification;
- `dump`: the dump job: inference streams, appends in dataset order, resume, torchrun shards;
- `loader`: where the dump's images come from (loader workers or the streams themselves);
- `pixel_sampling`: which pixels a dump keeps.
"""

from __future__ import annotations

from blda_tools.inference.dump import DumpSummary, dump_logits, prepare_dump
from blda_tools.inference.pixel_sampling import PixelSampling
from blda_tools.inference.predict import InferenceSettings, predict_logits, select_device

__all__ = [
    "DumpSummary",
    "InferenceSettings",
    "PixelSampling",
    "dump_logits",
    "predict_logits",
    "prepare_dump",
    "select_device",
]
