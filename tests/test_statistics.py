"""Streaming logit-set statistics, checked against numpy / scikit-learn on the same rows."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix

import blda_tools.statistics.logit_sets as logit_sets_module
from blda_tools.errors import BLDAError
from blda_tools.statistics import LogitGrid, LogitSetStatistics, collect_statistics, first_argmax

GRID = LogitGrid(-4.0, 4.0, 16)  # width 0.5


def away_from_edges(rng: np.random.Generator, shape, grid: LogitGrid, spread: int = 2):
    """Values at least 5% of a bin from every edge (bin assignment is float32 arithmetic),
    including some up to `spread` bins outside the grid on both sides."""
    bins = rng.integers(-spread, grid.bins + spread, size=shape)
    offsets = rng.uniform(0.05, 0.95, size=shape)
    return (grid.low + (bins + offsets) * grid.width).astype(np.float32)


def random_rows(seed: int, n: int, num_classes: int = 3, ignore_fraction: float = 0.1):
    rng = np.random.default_rng(seed)
    logits = away_from_edges(rng, (n, num_classes), GRID)
    labels = rng.integers(0, num_classes, size=n)
    labels[rng.random(n) < ignore_fraction] = 255
    return logits, labels


def filled(logits, labels, num_classes: int = 3, grid: LogitGrid = GRID) -> LogitSetStatistics:
    statistics = LogitSetStatistics(num_classes, grid)
    statistics.update(torch.from_numpy(logits), torch.from_numpy(labels))
    return statistics


def assert_same(a: LogitSetStatistics, b: LogitSetStatistics) -> None:
    for name in ("histogram", "count", "confusion", "clipped", "minimum", "maximum"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("sum", "sum_squares"):
        # float64 sums of float32 values: only the order of the additions differs.
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-9)
    assert a.num_ignored == b.num_ignored


def assert_matches_numpy(statistics, logits, labels, num_classes=3, grid=GRID):
    """Every cell, the confusion matrix and the ignored count against numpy / scikit-learn."""
    logits = np.asarray(logits, dtype=np.float64)
    edges = np.linspace(grid.low, grid.high, grid.bins + 1)
    for c in range(num_classes):
        rows = logits[labels == c]
        for k in range(num_classes):
            values = rows[:, k]
            # Values outside the grid belong to the edge bins.
            expected, _ = np.histogram(np.clip(values, grid.low, grid.high), bins=edges)
            np.testing.assert_array_equal(statistics.histogram[c, k], expected)
            assert statistics.count[c, k] == len(values)
            if len(values) == 0:
                assert statistics.minimum[c, k] == np.inf and statistics.maximum[c, k] == -np.inf
                continue
            assert statistics.sum[c, k].item() == pytest.approx(values.sum(), rel=1e-12, abs=1e-9)
            assert statistics.mean()[c, k].item() == pytest.approx(
                values.mean(), rel=1e-12, abs=1e-12
            )
            # E[z^2] - E[z]^2 in float64 loses digits relative to E[z^2] only.
            variance_tolerance = 1e-12 * np.mean(values**2)
            assert statistics.variance()[c, k].item() == pytest.approx(
                values.var(), rel=1e-5, abs=variance_tolerance
            )
            assert statistics.std()[c, k].item() == pytest.approx(
                values.std(), rel=1e-5, abs=np.sqrt(variance_tolerance)
            )
            assert statistics.minimum[c, k].item() == values.min()
            assert statistics.maximum[c, k].item() == values.max()
            outside = np.sum((values < grid.low) | (values > grid.high))
            assert statistics.clipped[c, k].item() == outside
    kept = labels != 255
    if kept.any():
        expected_confusion = confusion_matrix(
            labels[kept], logits[kept].argmax(1), labels=list(range(num_classes))
        )
    else:
        expected_confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.testing.assert_array_equal(statistics.confusion, expected_confusion)
    assert statistics.num_ignored == int((~kept).sum())


def test_every_cell_matches_numpy():
    logits, labels = random_rows(0, 3000)
    assert_matches_numpy(filled(logits, labels), logits, labels)


def test_logit_maps_count_as_one_row_per_pixel():
    # a model's output (B, C, H, W) with its label maps (B, H, W), requiring grad
    generator = torch.Generator().manual_seed(3)
    maps = torch.nn.Conv2d(3, 3, 1)(torch.randn(2, 3, 5, 4, generator=generator))
    label_maps = torch.randint(0, 3, (2, 5, 4), generator=generator)
    label_maps[0, 0, :2] = 255
    statistics = LogitSetStatistics(3, GRID)
    statistics.update(maps, label_maps)
    # the rows written out pixel by pixel, checked against numpy cell by cell
    values = maps.detach().numpy()
    rows = np.array([values[b, :, h, w] for b in range(2) for h in range(5) for w in range(4)])
    labels = np.array(
        [label_maps[b, h, w].item() for b in range(2) for h in range(5) for w in range(4)]
    )
    assert_matches_numpy(statistics, rows, labels)
    with pytest.raises(BLDAError, match=r"labels: expected shape \(2, 5, 4\) to match"):
        statistics.update(maps, label_maps[:, :4])


def test_float16_logits_are_counted_as_their_exact_values():
    logits, labels = random_rows(12, 3000)
    half = logits.astype(np.float16)
    statistics = LogitSetStatistics(3, GRID)
    statistics.update(torch.from_numpy(half), torch.from_numpy(labels))
    assert_matches_numpy(statistics, half, labels)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.integers(1, 5),
    chunk_sizes=st.lists(st.integers(0, 400), min_size=1, max_size=6),
    half=st.booleans(),
)
@pytest.mark.filterwarnings("ignore:A single label was found")
def test_streamed_updates_match_numpy(seed, num_classes, chunk_sizes, half):
    """Chunks of any size, float16 or float32, with values beyond the grid: the running exact
    minimum / maximum, clipped counts and histograms equal numpy's on all rows at once."""
    logits, labels = random_rows(seed, sum(chunk_sizes), num_classes)
    if half:
        logits = logits.astype(np.float16)
    statistics = LogitSetStatistics(num_classes, GRID)
    for end, size in zip(np.cumsum(chunk_sizes), chunk_sizes, strict=True):
        rows = slice(end - size, end)
        statistics.update(torch.from_numpy(logits[rows]), torch.from_numpy(labels[rows]))
    assert_matches_numpy(statistics, logits, labels, num_classes)


def test_first_argmax_takes_the_first_of_tied_maxima_like_numpy():
    rng = np.random.default_rng(13)
    rows = 9000
    logits = rng.integers(-2, 3, size=(rows, 5)).astype(np.float32)  # many ties
    logits[:50] = 0.0
    logits[:50, :2] = -0.0  # -0.0 == 0.0: the first of them wins
    for values in (logits, logits.astype(np.float16)):
        found = first_argmax(torch.from_numpy(values))
        assert found.dtype == np.int64
        np.testing.assert_array_equal(found, values.argmax(1))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), classes=st.integers(1, 7))
def test_first_argmax_matches_numpy_including_ties(seed, classes):
    # Class-major input (C, n), as the Eq. 7 code holds it, read through its transpose.
    values = torch.randint(0, 3, (classes, 300), generator=torch.Generator().manual_seed(seed))
    got = first_argmax(values.float().T)
    assert np.array_equal(got, np.argmax(values.numpy(), 0))


def test_grid_edges_centers_width():
    grid = LogitGrid(-1.0, 3.0, 8)
    np.testing.assert_allclose(grid.edges, np.linspace(-1, 3, 9))
    np.testing.assert_allclose(grid.centers, np.arange(8) * 0.5 - 0.75)
    assert grid.width == 0.5
    with pytest.raises(BLDAError, match="LOW < HIGH"):
        LogitGrid(1.0, 1.0, 4)
    with pytest.raises(BLDAError, match="BINS"):
        LogitGrid(0.0, 1.0, 0)


def test_ignored_pixels_are_skipped():
    logits, labels = random_rows(1, 500, ignore_fraction=0.3)
    kept = labels != 255
    with_ignored = filled(logits, labels)
    only_kept = filled(logits[kept], labels[kept])
    for name in ("histogram", "count", "confusion", "minimum", "maximum", "clipped"):
        assert np.array_equal(getattr(with_ignored, name), getattr(only_kept, name)), name
    assert np.array_equal(with_ignored.sum, only_kept.sum)


def test_threads_give_the_same_result_bit_for_bit(monkeypatch):
    logits, labels = random_rows(2, 2000)
    monkeypatch.setattr(logit_sets_module, "UPDATE_THREADS", 1)
    one = filled(logits, labels)
    monkeypatch.setattr(logit_sets_module, "UPDATE_THREADS", 2)
    monkeypatch.setattr(logit_sets_module, "MIN_ROWS_PER_THREAD", 16)
    two = filled(logits, labels)
    # Each thread counts whole given classes, so every cell adds its rows in the same order.
    for name in ("histogram", "count", "confusion", "clipped", "minimum", "maximum", "sum"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert np.array_equal(one.sum_squares, two.sum_squares)
    # A bad value in the second thread's rows is still found, and nothing is counted.
    broken = logits.copy()
    broken[1900, 0] = np.nan
    with pytest.raises(BLDAError, match="NaN or infinite"):
        two.update(torch.from_numpy(broken), torch.from_numpy(labels))
    assert np.array_equal(one.histogram, two.histogram)


def test_merge_of_two_halves_equals_the_whole():
    logits, labels = random_rows(3, 1001)
    whole = filled(logits, labels)
    merged = filled(logits[:400], labels[:400]).merge(filled(logits[400:], labels[400:]))
    assert_same(merged, whole)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 60), st.integers(1, 60), st.integers(1, 60))
def test_merge_is_commutative_and_associative(seed, n1, n2, n3):
    parts = [random_rows(seed + i, n) for i, n in enumerate((n1, n2, n3))]

    def stats(i):
        return filled(*parts[i])

    left = stats(0).merge(stats(1)).merge(stats(2))
    right = stats(0).merge(stats(1).merge(stats(2)))
    swapped = stats(2).merge(stats(0)).merge(stats(1))
    assert_same(left, right)
    assert_same(left, swapped)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 300))
def test_density_integrates_to_one(seed, n):
    logits, labels = random_rows(seed, n)
    statistics = filled(logits, labels)
    total = statistics.density().sum(2) * GRID.width
    present = statistics.count > 0
    np.testing.assert_allclose(total[present], 1.0, rtol=1e-12)
    assert np.isnan(total[~present]).all()


def test_anchor_histograms_pool_diagonal_and_off_diagonal_cells():
    logits, labels = random_rows(4, 400)
    statistics = filled(logits, labels)
    kept = labels != 255
    edges = np.linspace(GRID.low, GRID.high, GRID.bins + 1)
    clipped = np.clip(logits[kept].astype(np.float64), GRID.low, GRID.high)
    own_class = np.eye(3, dtype=bool)[labels[kept]]
    positive, _ = np.histogram(clipped[own_class], bins=edges)
    negative, _ = np.histogram(clipped[~own_class], bins=edges)
    np.testing.assert_array_equal(statistics.positive_anchor_histogram(), positive)
    np.testing.assert_array_equal(statistics.negative_anchor_histogram(), negative)


def test_save_load_round_trip(tmp_path):
    logits, labels = random_rows(5, 300)
    statistics = LogitSetStatistics(3, GRID, class_names=["a", "b", "c"])
    statistics.update(torch.from_numpy(logits), torch.from_numpy(labels))
    statistics.save(tmp_path / "stats.h5")
    loaded = LogitSetStatistics.load(tmp_path / "stats.h5")
    assert_same(loaded, statistics)
    assert loaded.grid == GRID and loaded.class_names == ("a", "b", "c")
    assert not (tmp_path / "stats.h5.partial").exists()


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(BLDAError, match="text.h5"):
        LogitSetStatistics.load(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file.create_dataset("x", data=[1, 2])
    with pytest.raises(BLDAError, match="not a blda statistics file"):
        LogitSetStatistics.load(tmp_path / "other.h5")
    filled(*random_rows(6, 50)).save(tmp_path / "broken.h5")
    with h5py.File(tmp_path / "broken.h5", "a") as file:
        del file["confusion"]
    with pytest.raises(BLDAError, match="confusion"):
        LogitSetStatistics.load(tmp_path / "broken.h5")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f["histogram"].__setitem__((0, 0, 0), -5), "dataset 'histogram' holds values"),
        (lambda f: f["confusion"].__setitem__((1, 1), -1), "dataset 'confusion' holds values"),
        (lambda f: f.attrs.__setitem__("class_names", "abc"), "class_names is not a list"),
        (lambda f: f.attrs.__setitem__("class_names", ["a", "b"]), "3 classes"),
        (
            lambda f: f.attrs.__setitem__("label_source", "pseudo-ish"),
            "label_source is 'pseudo-ish'",
        ),
        (lambda f: f.attrs.__setitem__("num_classes", "abc"), "bad header field"),
        (lambda f: f.attrs.__setitem__("grid_low", 1e9), "grid_low / grid_high / grid_bins: "),
        (lambda f: f.attrs.__setitem__("stores", 7), "bad header field"),
        (lambda f: f.attrs.__setitem__("num_ignored", -5), "num_ignored is -5"),
        (lambda f: f.attrs.__setitem__("class_names", ["a", "a", "c"]), "names a class twice"),
    ],
)
def test_load_names_the_file_of_a_hand_edited_statistics_file(tmp_path, edit, message):
    path = tmp_path / "edited.h5"
    statistics = filled(*random_rows(6, 50))
    statistics.class_names = ("a", "b", "c")
    statistics.save(path)
    with h5py.File(path, "a") as file:
        edit(file)
    with pytest.raises(BLDAError, match=message) as raised:
        LogitSetStatistics.load(path)
    assert str(raised.value).startswith(f"{path}: "), raised.value


def test_load_reads_text_attributes_written_as_bytes_or_json(tmp_path):
    # h5py writes numpy bytes as bytes, and the logit store keeps class names as JSON text.
    path = tmp_path / "other_writer.h5"
    filled(*random_rows(6, 50)).save(path)
    with h5py.File(path, "a") as file:
        file.attrs["format"] = np.bytes_(b"blda-logit-statistics")
        file.attrs["class_names"] = '["road", "car", "bus"]'
    assert LogitSetStatistics.load(path).class_names == ("road", "car", "bus")


def test_merge_refuses_mismatches():
    statistics = LogitSetStatistics(3, GRID)
    with pytest.raises(BLDAError, match="grid"):
        statistics.merge(LogitSetStatistics(3, LogitGrid(-4.0, 4.0, 32)))
    with pytest.raises(BLDAError, match="classes"):
        statistics.merge(LogitSetStatistics(4, GRID))


def test_bad_input_raises_and_leaves_statistics_unchanged():
    logits, labels = random_rows(7, 100)
    statistics = filled(logits, labels)
    before = filled(logits, labels)
    bad_label = labels.copy()
    bad_label[5] = 3
    with pytest.raises(BLDAError, match=r"value 3 is outside \[0, 3\)"):
        statistics.update(torch.from_numpy(logits), torch.from_numpy(bad_label))
    for bad_value in (np.nan, np.inf):
        broken = logits.copy()
        broken[7, 1] = bad_value
        with pytest.raises(BLDAError, match="NaN or infinite"):
            statistics.update(torch.from_numpy(broken), torch.from_numpy(labels))
    with pytest.raises(BLDAError, match="labels: expected shape"):
        statistics.update(torch.from_numpy(logits), torch.from_numpy(labels[:-1]))
    with pytest.raises(BLDAError, match=r"logits: expected shape \(n, 3\) or \(B, 3, H, W\)"):
        statistics.update(torch.from_numpy(logits[:, :2]), torch.from_numpy(labels))
    assert_same(statistics, before)


# ---------------------------------------------------------------- collection from a logit store
store = pytest.importorskip("blda_tools.store")


def write_store(path, logits, labels=None):
    with store.LogitWriter(path, ["a", "b", "c"], dtype="float32") as writer:
        writer.add(logits, labels)
    return store.LogitStore(path)


def test_collect_ground_truth_and_pseudo_labels(tmp_path):
    logits, labels = random_rows(8, 700)
    labelled = write_store(tmp_path / "gt.h5", logits, labels)
    assert_same(
        collect_statistics(labelled, "gt", grid=GRID, rows_per_chunk=128), filled(logits, labels)
    )
    assert_same(collect_statistics(labelled, "auto", grid=GRID), filled(logits, labels))
    pseudo = collect_statistics(labelled, "pseudo", grid=GRID, rows_per_chunk=100)
    # Pseudo-labels cover every pixel, including those ignored in the ground truth.
    assert_same(pseudo, filled(logits, logits.argmax(1)))
    unlabelled = write_store(tmp_path / "nolabels.h5", logits)
    assert_same(collect_statistics(unlabelled, "auto", grid=GRID), pseudo)
    with pytest.raises(BLDAError, match="no ground-truth labels"):
        collect_statistics(unlabelled, "gt", grid=GRID)
    with pytest.raises(BLDAError, match="labels: expected one of"):
        collect_statistics(unlabelled, "truth", grid=GRID)


def test_collect_with_two_workers_equals_one(tmp_path):
    logits, labels = random_rows(9, 2000)
    labelled = write_store(tmp_path / "gt.h5", logits, labels)
    seen = []
    two = collect_statistics(
        labelled, grid=GRID, workers=2, rows_per_chunk=256, progress=seen.append
    )
    assert_same(two, collect_statistics(labelled, grid=GRID, rows_per_chunk=256))
    assert sum(seen) == 2000


def test_collect_from_a_float16_store_matches_numpy(tmp_path):
    logits, labels = random_rows(14, 900)
    with store.LogitWriter(tmp_path / "half.h5", ["a", "b", "c"]) as writer:  # float16
        writer.add(logits, labels)
    half = logits.astype(np.float16)
    with store.LogitStore(tmp_path / "half.h5") as opened:
        assert_matches_numpy(
            collect_statistics(opened, grid=GRID, rows_per_chunk=256), half, labels
        )
        pseudo = collect_statistics(opened, "pseudo", grid=GRID, rows_per_chunk=256)
    assert_matches_numpy(pseudo, half, half.argmax(1))


def test_collect_names_the_file_and_row_of_a_bad_value(tmp_path):
    logits, labels = random_rows(15, 300)
    path = tmp_path / "bad.h5"
    with store.LogitWriter(path, ["a", "b", "c"]) as writer:
        writer.add(logits, labels, name="only")
    with h5py.File(path, "r+") as file:  # corrupt the file behind the writer's back
        file["logits"][123, 2] = np.nan
    with store.LogitStore(path) as opened, pytest.raises(BLDAError) as caught:
        collect_statistics(opened, grid=GRID, rows_per_chunk=100)
    assert "bad.h5: rows [100, 200)" in str(caught.value)
    assert "NaN or Inf (first at row 123, image 'only')" in str(caught.value)


def test_many_small_updates_equal_one_update():
    # Exercises the running min/max refinement, which skips cells whose extremes can not change.
    logits, labels = random_rows(10, 3000)
    streamed = LogitSetStatistics(3, GRID)
    for start in range(0, 3000, 97):
        streamed.update(
            torch.from_numpy(logits[start : start + 97]),
            torch.from_numpy(labels[start : start + 97]),
        )
    assert_same(streamed, filled(logits, labels))


def test_confusion_takes_the_first_of_tied_maxima_like_numpy():
    rng = np.random.default_rng(11)
    logits = rng.integers(0, 3, size=(500, 4)).astype(np.float32)  # many ties
    labels = rng.integers(0, 4, size=500)
    statistics = filled(logits, labels, num_classes=4)
    expected = confusion_matrix(labels, logits.argmax(1), labels=list(range(4)))
    np.testing.assert_array_equal(statistics.confusion, expected)


@pytest.mark.parametrize("offset", [64, 200, 512, 4096])
def test_a_statistics_file_with_a_zeroed_block_names_itself(tmp_path, offset):
    # h5py's KeyError or RuntimeError ("bad symbol table node signature"), naming no file
    from blda_tools.errors import BLDAError
    from blda_tools.statistics import LogitGrid, LogitSetStatistics

    statistics = LogitSetStatistics(2, LogitGrid(-5, 5, 20), class_names=["a", "b"])
    statistics.update(torch.randn(50, 2), torch.randint(0, 2, (50,)))
    path = tmp_path / "statistics.h5"
    statistics.save(path)
    content = bytearray(path.read_bytes())
    content[offset : offset + 4096] = bytes(min(4096, len(content) - offset))
    path.write_bytes(bytes(content))
    with pytest.raises(BLDAError, match=f"^{path}: "):
        LogitSetStatistics.load(path)
