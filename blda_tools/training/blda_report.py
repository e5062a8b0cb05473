"""Periodic report of the online BLDA statistics during `blda train` (paper Fig. 7-8, Table 15).

Every `loss.blda_plot_interval` iterations: `RUN_DIR/blda/gmm_fits_<iteration>.png` (the
estimated source mixtures of a few cells over the histogram of the current source batch's logits
for those cells) and, in `log.jsonl` (kind "blda"), the JS divergence of each class's positive
and negative mixtures to the anchors, per domain.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from blda_tools.gmm import mixture_pdf
from blda_tools.online.loss import BLDALoss
from blda_tools.online.state import MixtureSet
from blda_tools.statistics.metrics import js_divergence

REPORT_DIR = "blda"
GRID_POINTS = 512
PLOTTED_CLASSES = 4
# Densities are evaluated over the components' mean +- this many standard deviations.
GRID_SPREAD = 4.0


def density_grid(sets: list[MixtureSet], points: int = GRID_POINTS) -> Tensor:
    """Evenly spaced points covering every fitted component of `sets` (mean +- 4 sigma)."""
    lows, highs = [], []
    for mixture_set in sets:
        fitted = mixture_set.fitted
        if not bool(fitted.any()):
            continue
        spread = GRID_SPREAD * mixture_set.variances[fitted].sqrt()
        lows.append((mixture_set.means[fitted] - spread).min())
        highs.append((mixture_set.means[fitted] + spread).max())
    if not lows:
        return torch.linspace(-1.0, 1.0, points)
    return torch.linspace(float(min(lows)), float(max(highs)), points)


def _densities(mixture_set: MixtureSet, grid: Tensor) -> Tensor:
    """(*cells, G) mixture densities of every cell of the set on `grid`, on the CPU."""
    density = mixture_pdf(
        grid.to(mixture_set.means), mixture_set.weights, mixture_set.means, mixture_set.variances
    )
    return density.cpu()


def anchor_js_divergences(blda: BLDALoss, grid: Tensor | None = None) -> dict[str, dict] | None:
    """Table 15 on the online estimates: per domain, `positive[l]` = JS(P_ll, P_p) and
    `negative[l]` = mean over fitted c != l of JS(P_cl, P_n) (column l: class l's logit on
    pixels of other classes, as `metrics.anchor_divergences`), natural log; NaN where a cell
    was never fitted. The densities are compared on `grid` (evenly spaced, so as masses).
    None while the anchors are not fitted."""
    if not bool(blda.anchors.fitted.all()):
        return None
    domains = {"source": blda.source} if blda.mode != "ola" else {
        "source": blda.source, "target": blda.target
    }  # fmt: skip
    if grid is None:
        grid = density_grid([blda.anchors, *domains.values()]).cpu()
    anchors = _densities(blda.anchors, grid)  # (2, G): positive, negative
    result = {}
    for name, mixture_set in domains.items():
        cells = _densities(mixture_set, grid)  # (C, C, G), cell [c, l]
        fitted = mixture_set.fitted.cpu()
        diagonal = torch.eye(fitted.shape[0], dtype=torch.bool)
        positive = torch.from_numpy(js_divergence(cells.diagonal(dim1=0, dim2=1).t(), anchors[0]))
        positive = torch.where(fitted.diagonal(), positive, math.nan)
        negative_cells = torch.from_numpy(js_divergence(cells, anchors[1]))  # (C, C)
        usable = fitted & ~diagonal
        count = usable.sum(0)
        total = torch.where(usable, negative_cells, 0.0).sum(0)
        negative = torch.where(count > 0, total / count.clamp_min(1), math.nan)
        result[name] = {"positive": positive.tolist(), "negative": negative.tolist()}
    return result


def plotted_cells(blda: BLDALoss, logits: Tensor, labels: Tensor) -> list[tuple[int, int]]:
    """Up to 4 classes of the batch with the most pixels and a fitted source row; for each,
    its positive cell (c, c) and the negative cell (c, l) of its strongest rival l (the class
    with the highest mean logit on pixels of c)."""
    classes = blda.num_classes
    valid = labels != blda.ignore_index
    pixel_labels = labels[valid]
    pixel_logits = logits.permute(0, 2, 3, 1)[valid]  # (P, C)
    counts = torch.bincount(pixel_labels, minlength=classes).to(pixel_logits.dtype)
    sums = torch.zeros(classes, classes, device=logits.device).index_add_(
        0, pixel_labels, pixel_logits
    )
    mean_logits = sums / counts.clamp_min(1)[:, None]  # [c, l]: mean logit l on pixels of c
    mean_logits.fill_diagonal_(-math.inf)
    rival = mean_logits.argmax(1)
    eligible = (counts > 0) & blda.source.fitted.all(1).to(counts.device)
    order = torch.argsort(torch.where(eligible, counts, -1.0), descending=True)
    chosen = [int(c) for c in order[: min(PLOTTED_CLASSES, int(eligible.sum()))]]
    return [cell for c in chosen for cell in ((c, c), (c, int(rival[c])))]


def write_report(blda: BLDALoss, captured, run_dir, iteration: int, class_names=None) -> dict:
    """Write the GMM-fit figure of the captured source batch; return the log record's fields.
    Panels are titled by class name when `class_names` are given, else by class index."""
    from blda_tools.plots import plot_gmm_fits

    record: dict = {"js_to_anchors": anchor_js_divergences(blda)}
    if captured is None:
        return record
    logits, labels = captured
    cells = plotted_cells(blda, logits, labels)
    if not cells:
        return record
    # One grid for all panels: the logits of the plotted cells and their mixtures' bulk.
    rows = torch.tensor([row for row, _ in cells])
    columns = torch.tensor([column for _, column in cells])
    values = [logits[:, column][labels == row] for row, column in cells]
    low = min(float(v.min()) for v in values)
    high = max(float(v.max()) for v in values)
    spread = GRID_SPREAD * blda.source.variances[rows, columns].sqrt()
    low = min(low, float((blda.source.means[rows, columns] - spread).min()))
    high = max(high, float((blda.source.means[rows, columns] + spread).max()))
    edges = torch.linspace(low, high, 81)
    centers = (edges[1:] + edges[:-1]) / 2
    histograms, densities = {}, {}
    fitted = _densities(blda.source, centers)
    for (row, column), value in zip(cells, values, strict=True):
        label, logit = (row, column) if not class_names else (class_names[row], class_names[column])
        title = f"label {label}, logit {logit}" + (" (positive)" if row == column else "")
        histograms[title] = torch.histogram(value.cpu(), bins=edges).hist.tolist()
        densities[title] = fitted[row, column].tolist()
    path = Path(run_dir) / REPORT_DIR / f"gmm_fits_{iteration:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_gmm_fits(centers.tolist(), histograms, densities, path=path)
    record["gmm_fits"] = str(path.relative_to(run_dir))
    record["plotted_cells"] = [list(cell) for cell in cells]
    return record
