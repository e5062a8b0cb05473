"""Plain words for the reports: what each column means, what the numbers say, what to run next.

Shared by `diagnose` (report.html), `calibrate` (its summary) and `demo` (its report), so each
column is explained once and in the same words everywhere.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

# A class is "balanced" when its predicted share is within this fraction of the uniform share
# 1/C that Eq. 4 compares against: |Bias| <= BALANCED_SHARE / C.
BALANCED_SHARE = 0.1

CLASS_COLUMNS = {
    "class": "the class name, as stored in the logit store",
    "pixels": "labelled pixels of the class (its ground-truth frequency)",
    "IoU": "intersection over union of the class's prediction with its ground truth",
    "Acc": "accuracy of the class: the share of its pixels predicted as it (recall)",
    "Bias (Eq. 4)": "mean over true classes c of P(predicted l | c), minus 1/C, from the "
    "confusion matrix: > 0 the class is predicted too often (over), < 0 too rarely (under)",
    "Bias est. (Eq. 5)": "the same Bias estimated from the logit distributions alone, with no "
    "label: what diagnose can tell on unlabelled target data",
    "JS pos": "Jensen-Shannon divergence (0 to ln 2 = 0.693) between the class's own logits on "
    "its pixels and the pooled positive anchor: how far its confidence is from the typical class",
    "JS neg": "the mean JS divergence of the class's logits on other classes' pixels to the "
    "pooled negative anchor: how far its false-alarm logits are from the typical class",
}

CHANGE_COLUMNS = {
    "IoU after": "IoU after calibration at the chosen tau",
    "dIoU": "IoU after minus before, in points (green: better, red: worse)",
    "Acc after": "accuracy after calibration at the chosen tau",
    "dAcc": "accuracy after minus before, in points (green: better, red: worse)",
}

SUMMARY_COLUMNS = {
    "predictions": "which predictions the row scores",
    "mIoU": "mean IoU over the classes present, or those of --eval-classes (the usual headline metric)",
    "mAcc": "mean class accuracy: every class counts the same, however rare",
    "IoU std": "population standard deviation of the per-class IoU: lower is more even",
    "Acc std": "population standard deviation of the per-class accuracy",
    "Spearman(Eq. 4, Eq. 5)": "rank correlation of the Bias from labels (Eq. 4) and from "
    "logits alone (Eq. 5): near 1, the logits tell the bias without labels",
}

GROUP_COLUMNS = {
    "group": "over: Bias > tolerance (predicted too often); under: Bias < -tolerance (too "
    "rarely); balanced: |Bias| <= tolerance (Table 18 groups, with the balanced ones apart)",
    "classes": "the classes of the group",
    "IoU mean": "mean IoU of the group's classes (over-predicted classes tend to score higher)",
    "IoU std": "population standard deviation of their IoU",
    "Acc mean": "mean accuracy of the group's classes",
    "Acc std": "population standard deviation of their accuracy",
}


def balanced_tolerance(num_classes: int) -> float:
    """|Bias| at or below which a class counts as balanced (a tenth of the uniform share)."""
    return BALANCED_SHARE / num_classes


def tolerance_sentence(num_classes: int) -> str:
    tolerance = balanced_tolerance(num_classes)
    return (
        f"A class is called balanced when |Bias| <= {tolerance:.4f} (a tenth of the uniform "
        f"share 1/C = 1/{num_classes}); over- and under-predicted classes lie beyond that."
    )


def columns_explained(columns: Sequence[str], *tables: dict[str, str]) -> list[tuple[str, str]]:
    """`(column, meaning)` for each of `columns` found in `tables` (CLASS_COLUMNS first)."""
    meanings: dict[str, str] = {}
    for table in (CLASS_COLUMNS, *tables):
        meanings.update(table)
    return [(column, meanings[column]) for column in columns if column in meanings]


def command(*words: object) -> str:
    """A shell command line with each word quoted as the shell needs."""
    return " ".join(shlex.quote(str(word)) for word in words)


def sibling(out_dir: str | Path, name: str) -> Path:
    """`name` next to `out_dir` (diagnosis/ -> calibration/)."""
    return Path(out_dir).parent / name


def after_diagnose(stores: Sequence[str], out_dir: str | Path, has_labels: bool) -> list[str]:
    """The next commands after `blda diagnose STORES --out OUT_DIR`. Without labels in STORES
    tau is chosen on a held-out labelled store, or given."""
    calibration = sibling(out_dir, "calibration")
    held_out = ("--select-on", "HELD_OUT.h5", "--out", calibration)
    if not has_labels:
        return [
            command("blda", "calibrate", *stores, *held_out),
            command("blda", "calibrate", *stores, "--tau", "0.5", "--out", calibration),
        ]
    return [
        command("blda", "calibrate", *stores, "--out", calibration),
        command("blda", "calibrate", *stores, "--fit-on", "TARGET_TRAIN.h5", *held_out),
    ]


def after_calibrate(stores: Sequence[str], out_dir: str | Path) -> list[str]:
    """The next commands after `blda calibrate STORES --out OUT_DIR`."""
    calibrator = Path(out_dir) / "calibrator.pt"
    return [
        command(
            "blda",
            "calibrate",
            "--apply",
            calibrator,
            *stores,
            "--out",
            sibling(out_dir, "predictions"),
        ),  # fmt: skip
        command("blda", "export", calibrator, "--out", sibling(out_dir, "balanced.pt")),
    ]


def bias_findings(names: Sequence[str], bias: Sequence[float], tolerance: float, source: str):
    """Sentences: which classes are over- / under-predicted (largest first) or balanced."""
    valid = [(value, name) for name, value in zip(names, bias, strict=True) if value == value]
    over = sorted((v, n) for v, n in valid if v > tolerance)[::-1]
    under = sorted((v, n) for v, n in valid if v < -tolerance)
    balanced = [n for v, n in valid if abs(v) <= tolerance]

    def listed(group) -> str:
        shown = ", ".join(f"{n} ({v:+.3f})" for v, n in group[:4])
        return shown + (f" and {len(group) - 4} more" if len(group) > 4 else "")

    def classes(count: int) -> str:
        return f"{count} class is" if count == 1 else f"{count} classes are"

    sentences = []
    if over:
        sentences.append(f"{classes(len(over))} over-predicted ({source}): {listed(over)}.")
    if under:
        sentences.append(f"{classes(len(under))} under-predicted ({source}): {listed(under)}.")
    if balanced:
        sentences.append(f"{classes(len(balanced))} balanced: {', '.join(balanced)}.")
    return sentences


def rank_agreement(correlation: float | None) -> str | None:
    """What the Spearman correlation between Eq. 4 and Eq. 5 means for unlabelled data."""
    if correlation is None or correlation != correlation:
        return None
    if correlation >= 0.8:
        return (
            f"The logit-only estimate (Eq. 5) ranks the classes like the ground truth (Spearman "
            f"{correlation:.3f}): on unlabelled data of this kind, diagnose alone shows the bias."
        )
    return (
        f"The logit-only estimate (Eq. 5) agrees only loosely with the ground truth (Spearman "
        f"{correlation:.3f}): trust Eq. 4 here, and Eq. 5 on unlabelled data with care."
    )
