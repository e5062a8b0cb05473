"""Running a model over a dataset, and the `blda dump-logits` job.

- `predict`: whole-image and sliding-window inference, device choice (`predict_logits`,
  `predict_images` for uint8 images resized as mmcv does, `predict_classes` for classifiers);
- `protocols`: each model family's test protocol, the default of a dump; `resize`: mmcv's
  keep-ratio sizes and OpenCV resize of uint8 images; `tasks`: segmentation or classification;
- `dump`: the dump job: appends in dataset order, resume, torchrun shards (`dump_summary`:
  what it did); `streams`: how many
  forward passes run at once, on how many threads;
- `loader`: where the dump's images come from (loader workers or the streams themselves);
- `pixel_sampling`: which pixels a dump keeps.

The names below are imported from their modules on first use (PEP 562), so that the CLI can
read `MODES` for `blda dump-logits --help` without importing torch.
"""

from __future__ import annotations

from blda_tools.runtime.lazy import lazy_exports

# The inference modes `predict_logits` knows (`predict.InferenceSettings.mode`).
MODES = ("whole", "slide")

_EXPORTS = {
    "DumpSummary": "dump_summary",
    "dump_logits": "dump",
    "prepare_dump": "dump",
    "PixelSampling": "pixel_sampling",
    "InferenceSettings": "predict",
    "predict_logits": "predict",
    "select_device": "predict",
}

__all__ = sorted([*_EXPORTS, "MODES"])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
