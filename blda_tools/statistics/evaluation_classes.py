"""The classes mIoU and mAcc average over: all, a benchmark's subset, or a list of names.

SYNTHIA -> Cityscapes is reported on 16 classes (no terrain, truck, train) and on 13 (also
no wall, fence, pole), as DAFormer, HRDA and MIC do: the IoU of each class still comes from
the full 19-class confusion matrix (pixels predicted as train count against their class);
only the mean and the std run over the subset. Training's `evaluation.classes` is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from blda_tools.errors import BLDAError

# The named subsets, and the option that takes them (`--eval-classes`).
SUBSETS = ("synthia16", "synthia13")
OPTION = "--eval-classes"


def evaluation_classes(
    spec: str | Sequence[str] | None, class_names: Sequence[str]
) -> tuple[int, ...]:
    """Class ids for `spec`: () for None or "all" (every class), those of "synthia16" /
    "synthia13" (which need the 19 Cityscapes classes), or of names ("road,car" or a list)."""
    keyword = spec.strip().lower() if isinstance(spec, str) else None
    if spec is None or keyword == "all":
        return ()
    names = [str(name) for name in class_names]
    if keyword in SUBSETS:
        spec = keyword
        from blda_tools.datasets.synthia import (  # imports torch: only when asked for
            CITYSCAPES_CLASSES,
            SYNTHIA_13_CLASSES,
            SYNTHIA_16_CLASSES,
        )

        if tuple(names) != CITYSCAPES_CLASSES:
            raise BLDAError(
                f"{OPTION} {spec}: the SYNTHIA subsets are of the 19 Cityscapes classes, but "
                f"the store has {len(names)} other classes; give class names instead"
            )
        return SYNTHIA_16_CLASSES if spec == "synthia16" else SYNTHIA_13_CLASSES
    wanted = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted = [str(name).strip() for name in wanted if str(name).strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown or not wanted:
        what = f"unknown class {unknown[0]!r}" if unknown else "no class given"
        raise BLDAError(
            f"{OPTION}: {what}; expected all, {', '.join(SUBSETS)} or class names from: "
            f"{', '.join(names)}"
        )
    if len(set(wanted)) != len(wanted):
        raise BLDAError(f"{OPTION}: a class is named twice in {spec!r}")
    if len(wanted) == len(names):  # every class: the same as "all"
        return ()
    return tuple(sorted(names.index(name) for name in wanted))


def averaging_note(classes: Sequence[int], class_names: Sequence[str]) -> str:
    """The report's note on a subset: "mIoU and mAcc average over 16 of 19 classes (no
    terrain, truck, train)." (`classes` as `evaluation_classes` gives them, not empty)."""
    left_out = [str(name) for c, name in enumerate(class_names) if c not in set(classes)]
    return (
        f"mIoU and mAcc average over {len(classes)} of {len(class_names)} classes "
        f"(no {', '.join(left_out)})."
    )


# A note for a run with --eval-classes but no metrics (stores without labels).
UNUSED_EVAL_CLASSES = (
    "--eval-classes: the stores have no labelled pixel, so there is no mIoU or mAcc to average "
    "over those classes; the option changes nothing here"
)
