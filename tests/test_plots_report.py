"""Plots write real PNGs for every input shape we meet; the HTML report is one safe, self-contained file.

Truths used: the PNG signature and Pillow's decoder, scipy's normal quantiles, matplotlib's own text
extents, and the standard-library HTML parser (which unescapes entities exactly as a browser does).
"""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy.stats import norm

from blda_tools import plots
from blda_tools.errors import BLDAError
from blda_tools.report.html import Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CITYSCAPES = (
    "road sidewalk building wall fence pole light sign vegetation terrain sky person rider car "
    "truck bus train motorcycle bicycle"
).split()


def assert_valid_png(path: Path) -> tuple[int, int]:
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
        width, height = image.size
    assert 300 <= width <= 4000 and 200 <= height <= 4000, (width, height)
    assert not path.with_name(path.name + ".partial").exists()
    return width, height


def made_up_results(num_classes: int, seed: int = 0) -> dict:
    """Plausible diagnose outputs with the awkward cases: class 1 has no pixels at all."""
    rng = np.random.default_rng(seed)
    names = (
        CITYSCAPES[:num_classes]
        if num_classes <= len(CITYSCAPES)
        else [f"c{i}" for i in range(num_classes)]
    )
    centers = np.linspace(-15.0, 25.0, 401)
    positive = np.stack([norm.pdf(centers, rng.normal(8, 3), 2.0) for _ in range(num_classes)])
    negative = np.stack([norm.pdf(centers, rng.normal(-2, 2), 3.0) for _ in range(num_classes)])
    positive[1] = negative[1] = 0.0
    confusion = rng.integers(0, 40, (num_classes, num_classes)) + np.diag(
        rng.integers(100, 10_000, num_classes)
    )
    confusion[1] = 0
    pixels = confusion.sum(axis=1)
    accuracy = np.diag(confusion) / np.maximum(pixels, 1)
    accuracy[1] = np.nan
    bias = rng.normal(0, 0.02, num_classes)
    bias[1] = np.nan
    return {
        "names": names,
        "centers": centers,
        "positive": positive,
        "negative": negative,
        "positive_anchor": norm.pdf(centers, 8, 2.5),
        "negative_anchor": norm.pdf(centers, -2, 3.5),
        "confusion": confusion,
        "pixels": pixels,
        "accuracy": accuracy,
        "bias": bias,
        "bias_estimated": bias + rng.normal(0, 0.004, num_classes),
    }


def draw_all(data: dict, out: Path) -> list[Path]:
    names, centers = data["names"], data["centers"]
    taus = np.linspace(0.0, 1.0, 6)
    cells = {
        "cell (0, 0)": data["positive"][0],
        "cell (1, 1)": data["positive"][1],
        "cell (0, 2)": data["negative"][2],
    }
    return [
        plots.plot_bias(names, data["bias"], data["bias_estimated"], path=out / "bias.png"),
        plots.plot_bias(names, data["bias"], path=out / "bias_no_estimate.png"),
        plots.plot_logit_densities(
            names,
            centers,
            data["positive"],
            data["negative"],
            data["positive_anchor"],
            data["negative_anchor"],
            path=out / "densities.png",
        ),
        plots.plot_confusion(names, data["confusion"], path=out / "confusion.png"),
        plots.plot_frequency_vs_accuracy(
            names, data["pixels"], data["accuracy"], path=out / "frequency.png"
        ),
        plots.plot_tau_sweep(
            {
                "blda": (taus, 0.5 + 0.1 * taus, 0.6 + 0.1 * taus),
                "prior": (taus, 0.5 - 0.01 * taus, 0.6 + taus / 20),
            },
            chosen_tau=0.4,
            baseline=(0.5, 0.6),
            path=out / "tau_methods.png",
        ),
        plots.plot_tau_sweep(taus, 0.5 + 0.1 * taus, 0.6 + 0.1 * taus, path=out / "tau_single.png"),
        plots.plot_per_class_change(
            names, data["accuracy"], data["accuracy"] + 0.01, "accuracy", path=out / "change.png"
        ),
        # A cell whose fit is missing and one whose histogram is empty.
        plots.plot_gmm_fits(
            centers,
            cells,
            {"cell (0, 0)": cells["cell (0, 0)"], "cell (1, 1)": cells["cell (0, 2)"]},
            path=out / "gmm.png",
        ),
        plots.plot_training_curves(
            [{"iteration": i, "loss_source": 1.0 / (i + 1)} for i in range(0, 500, 10)]
            + [{"iteration": 250, "miou": 0.4, "macc": 0.5}, {"iteration": 500, "miou": 0.45}],
            path=out / "training.png",
        ),
    ]


@pytest.mark.parametrize("num_classes", [3, 19])
def test_every_plot_writes_a_valid_png_including_missing_classes(tmp_path, num_classes):
    written = draw_all(made_up_results(num_classes), tmp_path)
    assert len(set(written)) == len(written)
    for path in written:
        assert path.exists()
        assert_valid_png(path)


def test_class_names_with_dollar_signs_are_drawn_as_text(tmp_path):
    # Read as mathtext, "$\\foo$" raised ParseFatalException and ended diagnose / calibrate.
    from matplotlib import rcParams

    data = made_up_results(3)
    data["names"] = ["$\\foo$", "cost $5 to $10", "$x_{2}$"]
    for path in draw_all(data, tmp_path):
        assert_valid_png(path)
    assert rcParams["text.parse_math"] is True  # the session's own setting is left alone


def test_plots_survive_all_nan_and_empty_inputs(tmp_path):
    names = ["a", "b", "c"]
    centers = np.linspace(-1, 1, 50)
    empty = np.zeros((3, 50))
    assert_valid_png(plots.plot_bias(names, [np.nan] * 3, [np.nan] * 3, path=tmp_path / "bias.png"))
    assert_valid_png(
        plots.plot_logit_densities(
            names, centers, empty, empty, np.zeros(50), np.zeros(50), path=tmp_path / "d.png"
        )
    )
    assert_valid_png(plots.plot_confusion(names, np.zeros((3, 3)), path=tmp_path / "confusion.png"))
    assert_valid_png(
        plots.plot_frequency_vs_accuracy(names, [0, 0, 0], [np.nan] * 3, path=tmp_path / "f.png")
    )
    assert_valid_png(plots.plot_training_curves([{"iteration": 0}], path=tmp_path / "t.png"))


def test_bad_plot_inputs_raise_errors_naming_the_field(tmp_path):
    names = ["a", "b", "c"]
    with pytest.raises(BLDAError, match="bias: expected 3 values"):
        plots.plot_bias(names, [0.1, 0.2], path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match=r"confusion: expected shape \(3, 3\)"):
        plots.plot_confusion(names, np.ones((3, 2)), path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="confusion: expected finite, non-negative"):
        plots.plot_confusion(names, -np.ones((3, 3)), path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match=r"negative_density: expected shape \(3, 10\)"):
        plots.plot_logit_densities(
            names,
            np.arange(10.0),
            np.ones((3, 10)),
            np.ones((3, 9)),
            np.ones(10),
            np.ones(10),
            path=tmp_path / "x.png",
        )
    with pytest.raises(BLDAError, match="grid_centers: expected at least two strictly increasing"):
        plots.plot_gmm_fits([0.0, 0.0, 1.0], {"a": [1, 1, 1]}, {}, path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="gmm_densities has titles without a histogram"):
        plots.plot_gmm_fits([0.0, 1.0], {"a": [1, 1]}, {"b": [1, 1]}, path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="either a mapping"):
        plots.plot_tau_sweep({"blda": ([0], [0.5], [0.5])}, [0.5], [0.5], path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="miou and macc are required"):
        plots.plot_tau_sweep([0, 1], [0.5, 0.6], path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="blda miou: expected 2 values"):
        plots.plot_tau_sweep({"blda": ([0, 1], [0.5], [0.5, 0.6])}, path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="'iteration'"):
        plots.plot_training_curves([{"loss": 1.0}], path=tmp_path / "x.png")
    with pytest.raises(BLDAError, match="class_names"):
        plots.plot_bias([], [], path=tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_a_failed_plot_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "bias.png"
    target.write_bytes(b"previous figure")

    def crash_midway(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_SIGNATURE + b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", crash_midway)
    with pytest.raises(RuntimeError):
        plots.plot_bias(["a", "b"], [0.1, -0.1], path=target)
    assert target.read_bytes() == b"previous figure"
    assert [p.name for p in tmp_path.iterdir()] == ["bias.png"]


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0"), (950, "950"), (12_345, "12.3k"), (4_560_000, "4.56M"), (1.2e9, "1.2G")],
)
def test_format_count_by_hand(count, text):
    assert plots.format_count(count) == text


def test_density_x_range_covers_the_gaussian_bulk():
    centers = np.linspace(-30, 30, 6001)
    curves, has_mass = plots._unit_area(
        centers, np.stack([norm.pdf(centers, 2, 3), norm.pdf(centers, -4, 1)])
    )
    assert has_mass.all()
    np.testing.assert_allclose(curves @ np.gradient(centers), 1.0, rtol=1e-9)
    low, high = plots._mass_range(centers, curves)
    # The wider curve reaches further on both sides.
    true_low = min(norm.ppf(0.001, -4, 1), norm.ppf(0.001, 2, 3))
    true_high = max(norm.ppf(0.999, -4, 1), norm.ppf(0.999, 2, 3))
    span = true_high - true_low
    # The 0.1% / 99.9% quantiles plus a 5% margin (to a grid step of 0.01).
    assert true_low - 0.06 * span < low < true_low - 0.04 * span
    assert true_high + 0.04 * span < high < true_high + 0.06 * span


def test_point_labels_are_moved_apart():
    figure = Figure(figsize=(4, 3), dpi=plots.DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = [
        axes.annotate(f"class {i}", (1.0, 1.0), xytext=(5, 2), textcoords="offset points")
        for i in range(6)
    ]
    renderer = figure.canvas.get_renderer()
    assert labels[0].get_window_extent(renderer).overlaps(labels[1].get_window_extent(renderer))
    plots._separate_labels(figure, labels)
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(6) for j in range(i + 1, 6))


# --- report ---------------------------------------------------------------------------------


class ParsedHTML(HTMLParser):
    """Tags with their attributes, and table cells as (classes, text) as a browser would show them."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.cells: list[tuple[str, str]] = []
        self.text: list[str] = []
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "td":
            self._cell = [dict(attrs).get("class", ""), ""]

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1] += data


def test_report_embeds_images_as_data_uris_and_needs_nothing_external(tmp_path):
    png = plots.plot_bias(["a", "b", "c"], [0.1, -0.05, -0.05], path=tmp_path / "bias.png")
    report = Report("Diagnosis").heading("Bias").image(png, "Bias per class (Eq. 4)")
    html_path = report.save(tmp_path / "report.html")
    parsed = ParsedHTML(html_path.read_text(encoding="utf-8"))
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 1
    prefix = "data:image/png;base64,"
    assert images[0]["src"].startswith(prefix)
    assert base64.b64decode(images[0]["src"][len(prefix) :]) == png.read_bytes()
    referencing = [(tag, attrs) for tag, attrs in parsed.tags if {"src", "href"} & set(attrs)]
    assert all(
        attrs.get("src", "").startswith("data:") and "href" not in attrs for _, attrs in referencing
    )
    assert not any(tag in ("script", "link", "iframe") for tag, _ in parsed.tags)


def test_report_escapes_every_piece_of_text(tmp_path):
    evil = "<b>\"bold\" & 'quoted'</b>"
    png = plots.plot_bias([evil, "b", "c"], [0.1, 0.0, -0.1], path=tmp_path / "bias.png")
    report = Report(evil).heading(evil).paragraph(evil).note(evil, kind="warning")
    report.table(["class", evil], [[evil, 1.0]], caption=evil).image(png, evil)
    parsed = ParsedHTML(report.to_html())
    assert "b" not in {tag for tag, _ in parsed.tags}
    # title, h1, heading, paragraph, note, caption, header, cell, figcaption: all shown verbatim.
    assert sum(chunk.count(evil) for chunk in parsed.text) == 9
    assert [attrs["alt"] for tag, attrs in parsed.tags if tag == "img"] == [evil]


def test_report_table_formats_numbers_and_shows_missing_values_as_na():
    rows = [
        ["road", 1_234_567, 0.12345, -0.25, float("nan")],
        ["train", np.int64(0), np.float64("nan"), 0.5, None],
        ["sky", 7, 1.0, 0.0, math.inf],
    ]
    report = Report("t").table(
        ["class", "pixels", "IoU", "change", "other"],
        rows,
        number_format={"IoU": ".1%", "other": ".2f"},
        signed_columns=["change"],
    )
    cells = ParsedHTML(report.to_html()).cells
    assert [text for _, text in cells] == [
        "road", "1,234,567", "12.3%", "-0.250", "n/a",
        "train", "0", "n/a", "+0.500", "n/a",
        "sky", "7", "100.0%", "0.000", "inf",
    ]  # fmt: skip
    classes = dict(zip([text for _, text in cells], [cls for cls, _ in cells], strict=False))
    assert "bad" in classes["-0.250"] and "good" in classes["+0.500"]
    assert "missing" in classes["n/a"] and "num" in classes["1,234,567"]
    flipped = ParsedHTML(
        Report("t").table(["d"], [[0.5]], signed_columns=["d"], higher_is_better=False).to_html()
    )
    assert "bad" in flipped.cells[0][0]


def test_report_rejects_bad_input_with_clear_errors(tmp_path):
    report = Report("t")
    with pytest.raises(BLDAError, match="row 1: expected 2 cells, got 1"):
        report.table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(BLDAError, match="signed_columns"):
        report.table(["a"], [[1]], signed_columns=["b"])
    with pytest.raises(BLDAError, match="column 'IoU': format 'd' cannot format 0.5"):
        report.table(["IoU"], [[0.5]], number_format={"IoU": "d"})
    with pytest.raises(BLDAError, match="note kind"):
        report.note("x", kind="error")
    not_png = tmp_path / "plot.png"
    not_png.write_bytes(b"GIF89a")
    with pytest.raises(BLDAError, match=r"plot\.png: not a PNG"):
        report.image(not_png)
    with pytest.raises(BLDAError, match=r"missing\.png: cannot read"):
        report.image(tmp_path / "missing.png")


def test_report_is_saved_atomically_as_utf8(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    Report("Straße — ü").paragraph("größer ≥ 1").save(target)
    assert "größer ≥ 1" in target.read_bytes().decode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    before = target.read_bytes()

    def crash_midway(self, text, encoding=None, **kwargs):
        with open(self, "w", encoding=encoding) as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", crash_midway)
    # The OS failure becomes the one-line error naming the file (the CLI prints it, exit 2).
    with pytest.raises(BLDAError, match="report.html: cannot write: disk full"):
        Report("second").paragraph("x" * 1000).save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA"))


def test_saved_figures_are_matplotlibs_tight_png_pixel_for_pixel(tmp_path, monkeypatch):
    """`_save` finds the tight box itself (one draw fewer); matplotlib's own
    `bbox_inches="tight"` is the truth, for the figures of every kind of layout."""
    data = made_up_results(19)
    written = draw_all(data, tmp_path / "ours")
    from blda_tools.plots import calibration, diagnosis, style, training

    def matplotlib_tight(figure, path, tight=True):
        with open(path, "wb") as file:
            figure.savefig(
                file, format="png", dpi=style.DPI, bbox_inches="tight" if tight else None,
                facecolor="white",
            )  # fmt: skip
        return Path(path)

    for module in (diagnosis, calibration, training):
        monkeypatch.setattr(module, "_save", matplotlib_tight)
    (tmp_path / "truth").mkdir()
    (tmp_path / "ours").mkdir(exist_ok=True)
    truth = draw_all(data, tmp_path / "truth")
    for ours, expected in zip(written, truth, strict=True):
        assert np.array_equal(pixels(ours), pixels(expected)), ours.name


def test_bias_plot_with_a_given_rank_correlation_draws_scipys_title(tmp_path):
    from scipy.stats import spearmanr

    data = made_up_results(19)
    finite = np.isfinite(data["bias"])  # class 1 has no pixels: left out, as the plot does
    rho = spearmanr(data["bias"][finite], data["bias_estimated"][finite]).statistic
    names = data["names"]
    computed = plots.plot_bias(names, data["bias"], data["bias_estimated"], path=tmp_path / "a.png")
    given = plots.plot_bias(
        names, data["bias"], data["bias_estimated"], path=tmp_path / "b.png", rank_correlation=rho
    )
    other = plots.plot_bias(
        names, data["bias"], data["bias_estimated"], path=tmp_path / "c.png", rank_correlation=-0.5
    )
    assert np.array_equal(pixels(computed), pixels(given))
    assert not np.array_equal(pixels(computed), pixels(other))  # the value reaches the title


def test_figure_workers_draw_the_same_pngs_and_raise_their_errors(tmp_path):
    """Two worker processes draw what this process draws; a bad input's `BLDAError` (raised in
    a worker) reaches the caller with its message."""
    from blda_tools.plots.workers import FigureWorkers

    data = made_up_results(5)
    names = data["names"]
    calls = {
        "confusion.png": ("plot_confusion", (names, data["confusion"])),
        "bias.png": ("plot_bias", (names, data["bias"], data["bias_estimated"])),
    }
    drawn = {}
    for processes in (0, 2):
        folder = tmp_path / str(processes)
        folder.mkdir()
        with FigureWorkers(processes) as figures:
            pending = {
                name: figures.submit(function, *args, path=folder / name)
                for name, (function, args) in calls.items()
            }
            drawn[processes] = {name: Path(figure.result()) for name, figure in pending.items()}
            bad = figures.submit("plot_bias", names, [0.1], path=folder / "bad.png")
            with pytest.raises(BLDAError, match="bias"):
                bad.result()
    for name in calls:
        assert drawn[2][name].parent == tmp_path / "2"
        assert np.array_equal(pixels(drawn[0][name]), pixels(drawn[2][name])), name


def test_training_curves_of_a_short_run_tick_whole_iterations(tmp_path, monkeypatch):
    import blda_tools.plots.training as training

    drawn = {}

    def keep_figure(figure, path, tight):
        drawn["figure"] = figure
        return path

    monkeypatch.setattr(training, "_save", keep_figure)
    records = [{"iteration": i, "source_loss": 1.0 / i, "miou": 0.1 * i} for i in (1, 2, 3)]
    training.plot_training_curves(records, path=tmp_path / "curves.png")
    for axes in drawn["figure"].axes:
        ticks = [t for t in axes.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
