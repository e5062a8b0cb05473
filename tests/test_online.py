"""The online BLDA loss against independent truths: F.cross_entropy, autograd on a reference,
closed forms, scipy, numpy moments and hand-built pixel layouts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats
from scipy.special import ndtri

from blda_tools.errors import BLDAError
from blda_tools.online.loss import BLDALoss
from blda_tools.online.sampling import class_balanced_anchors, draw_cell_samples, pixel_keys
from blda_tools.online.state import MixtureSet
from blda_tools.online.sync import RankSync

FAST = settings(max_examples=25, deadline=None)
IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(classes=4, batch=2, height=24, width=24, seed=0, ignored=0.1, separation=3.0):
    """Labels with every class present, logits N(0, 1) + `separation` on the labelled class,
    drawn with numpy (not with the code under test); a share of pixels ignored."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=(batch, height, width))
    logits = rng.normal(size=(batch, classes, height, width))
    logits += separation * np.moveaxis(np.eye(classes)[labels], -1, 1)
    labels[rng.random(labels.shape) < ignored] = IGNORE
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)


def fitted_loss(classes=4, iterations=3, **options):
    """A BLDALoss whose source (and target) statistics were updated on a few batches."""
    options = {"min_samples": 40, "max_samples_per_cell": 80, "momentum_warmup": 0, **options}
    blda = BLDALoss(classes, **options)
    for step in range(iterations):
        logits, labels = make_batch(classes, seed=100 + step)
        blda.update_statistics(logits, labels, domain="source")
        blda.update_statistics(logits, labels, torch.full(labels.shape, 0.5), domain="mixed")
    return blda


def reference_cross_entropy(logits, labels, weights=None, reduction="mean"):
    per_pixel = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE)
    if weights is not None:
        per_pixel = per_pixel * weights
    return {"mean": per_pixel.mean(), "sum": per_pixel.sum(), "none": per_pixel}[reduction]


def scipy_mixture_cdf(z, weights, means, variances):
    weights, means, variances = (
        np.asarray(p, dtype=np.float64) for p in (weights, means, variances)
    )
    return sum(
        w * stats.norm.cdf(z, m, np.sqrt(v))
        for w, m, v in zip(weights, means, variances, strict=True)
    )


# --------------------------------------------------------------------------- fixed offsets (Eq. 6)


@FAST
@given(
    cell_mean=st.floats(-4, 4),
    cell_std=st.floats(0.3, 3),
    anchor_mean=st.floats(-4, 4),
    anchor_std=st.floats(0.3, 3),
    eps=st.sampled_from([0.01, 0.05]),
)
def test_single_gaussian_offset_matches_closed_form(
    cell_mean, cell_std, anchor_mean, anchor_std, eps
):
    """K = 1: z' = mu_a + sigma_a clip((z - mu) / sigma, +-Phi^-1(1 - eps)) (Eq. 6 with clamp).
    Tolerance 1e-4 sigma_a: the cell's table is exact (z' is linear between the kinks, which
    are grid ends), the anchor's inverse is interpolated on 8192 probabilities."""
    blda = BLDALoss(2, n_components=1, min_samples=1, eps=eps)
    for mixture_set in (blda.source, blda.anchors):
        mixture_set.fitted.fill_(True)
    blda.source.means.fill_(cell_mean)
    blda.source.variances.fill_(cell_std**2)
    blda.anchors.means.fill_(anchor_mean)
    blda.anchors.variances.fill_(anchor_std**2)
    z = torch.linspace(cell_mean - 5 * cell_std, cell_mean + 5 * cell_std, 101)
    logits = torch.stack((z, z), dim=1)  # (N, C = 2): both columns carry z
    labels = torch.zeros(101, dtype=torch.int64)
    delta = blda.offsets(logits, labels).double().numpy()
    limit = ndtri(1 - eps)
    standard = np.clip((z.double().numpy() - cell_mean) / cell_std, -limit, limit)
    expected = anchor_mean + anchor_std * standard - z.double().numpy()
    # both anchors equal: positive (column 0, diagonal) and negative (column 1) agree
    np.testing.assert_allclose(delta[:, 0], expected, atol=1e-4 * anchor_std)
    np.testing.assert_allclose(delta[:, 1], expected, atol=1e-4 * anchor_std)


def test_offsets_match_scipy_on_fitted_mixtures():
    """Delta_{y,c}(z) = F_anchor^-1(clip(F_yc(z), eps, 1 - eps)) - z with scipy CDFs and brentq,
    using the fitted parameters; rows never updated and ignored pixels get no offset."""
    classes = 3
    blda = BLDALoss(classes, min_samples=40, max_samples_per_cell=80, momentum_warmup=0)
    logits, labels = make_batch(classes, seed=4)
    labels[labels == 2] = IGNORE
    labels[0, 0, :30] = 2  # 30 pixels of class 2: below min_samples, its row is never updated
    for _ in range(2):
        blda.update_statistics(logits, labels)
    assert blda.source.fitted[:2].all() and not blda.source.fitted[2].any()
    delta = blda.offsets(logits, labels)
    anchors = [
        [p[k].numpy() for p in (blda.anchors.weights, blda.anchors.means, blda.anchors.variances)]
        for k in (0, 1)
    ]

    def anchor_inverse(p, which):
        return optimize.brentq(
            lambda x: scipy_mixture_cdf(x, *anchors[which]) - p, -60, 60, xtol=1e-10
        )

    positions = [(0, 5, 7), (1, 10, 3), (0, 20, 20), (1, 2, 17)]
    errors = []
    for b, h, w in positions:
        y = int(labels[b, h, w])
        for c in range(classes):
            z = float(logits[b, c, h, w])
            if y in (2, IGNORE):
                assert delta[b, c, h, w] == 0
                continue
            cell = [
                p[y, c].numpy()
                for p in (blda.source.weights, blda.source.means, blda.source.variances)
            ]
            probability = np.clip(scipy_mixture_cdf(z, *cell), blda.eps, 1 - blda.eps)
            expected = anchor_inverse(probability, 0 if c == y else 1) - z
            errors.append(abs(float(delta[b, c, h, w]) - expected))
    assert len(errors) >= 6 and max(errors) < 1e-4  # tables' interpolation
    per_pixel = delta.permute(0, 2, 3, 1)
    assert (per_pixel[labels == 2] == 0).all() and (per_pixel[labels == IGNORE] == 0).all()
    assert (per_pixel[labels < 2] != 0).any()


# --------------------------------------------------------------------------- statistics


def test_tracking_drifting_gaussians():
    """Logits of class c, column l ~ N(mu_cl(t), 1) with means drifting by v = 0.02 per call:
    the momentum-EM mixture mean follows mu - v m / (1 - m) (the lag of an exponential moving
    average) within 0.1, and the variance stays within 0.2 of 1."""
    classes, drift, momentum = 2, 0.02, 0.9
    blda = BLDALoss(
        classes,
        n_components=2,
        momentum=momentum,
        momentum_warmup=0,
        min_samples=300,
        max_samples_per_cell=400,
    )
    rng = np.random.default_rng(5)
    start = np.array([[2.0, -1.0], [-2.0, 1.5]])
    labels = torch.tensor(np.repeat([0, 1], 500))
    for t in range(120):
        means = start + drift * t
        values = rng.normal(size=(1000, classes)) + means[labels.numpy()]
        blda.update_statistics(torch.tensor(values, dtype=torch.float32), labels)
    weights, component_means, variances = (
        blda.source.weights,
        blda.source.means,
        blda.source.variances,
    )
    mixture_mean = (weights * component_means).sum(-1).double().numpy()
    mixture_variance = (weights * (variances + component_means**2)).sum(
        -1
    ).double().numpy() - mixture_mean**2
    lagged = start + drift * 119 - drift * momentum / (1 - momentum)
    np.testing.assert_allclose(mixture_mean, lagged, atol=0.1)
    np.testing.assert_allclose(mixture_variance, 1.0, atol=0.2)
    assert blda.source.fitted.all() and (blda.source.steps == 0).all()


def test_absent_cells_keep_parameters_and_resume_with_momentum_power_n():
    """K = 1 and classes of exactly min_samples pixels (all of them are drawn): the new estimate
    is the numpy mean of the column; after n calls without class 2 the update is
    (1 - m^n) new + m^n old."""
    classes, count, momentum = 3, 60, 0.8
    blda = BLDALoss(
        classes, n_components=1, em_steps=1, momentum=momentum, momentum_warmup=0, min_samples=count
    )
    rng = np.random.default_rng(6)

    def batch(present):
        labels = np.repeat(present, count)
        values = rng.normal(size=(labels.size, classes)) + 3 * np.eye(classes)[labels]
        return torch.tensor(values, dtype=torch.float32), torch.tensor(labels), values

    logits, labels, _ = batch([0, 1, 2])
    blda.update_statistics(logits, labels)
    kept = blda.source.means[2].clone(), blda.source.variances[2].clone()
    for absent_calls in range(1, 4):
        logits, labels, _ = batch([0, 1])
        blda.update_statistics(logits, labels)
        assert torch.equal(blda.source.means[2], kept[0]) and torch.equal(
            blda.source.variances[2], kept[1]
        )
        assert (blda.source.steps[2] == absent_calls).all() and (blda.source.steps[:2] == 0).all()
    logits, labels, values = batch([0, 1, 2])
    blda.update_statistics(logits, labels)
    share = momentum**4  # n = 4 calls since row 2's last update
    fresh = values[labels.numpy() == 2].mean(axis=0)
    expected = (1 - share) * fresh + share * kept[0][:, 0].double().numpy()
    np.testing.assert_allclose(
        blda.source.means[2, :, 0].double().numpy(), expected, rtol=0, atol=1e-5
    )


def test_first_update_takes_the_new_estimate_and_warmup_ramp():
    blda = BLDALoss(2, n_components=1, em_steps=1, momentum=0.99, momentum_warmup=4, min_samples=50)
    assert blda.source.effective_momentum(0.99, 4) == 0.0
    blda.source.updates.fill_(2)
    assert blda.source.effective_momentum(0.99, 4) == pytest.approx(0.495)
    blda.source.updates.fill_(9)
    assert blda.source.effective_momentum(0.99, 4) == 0.99
    assert blda.source.effective_momentum(0.99, 0) == 0.99
    blda.source.updates.fill_(5)  # the ramp would mix, but a never-fitted cell takes the estimate
    rng = np.random.default_rng(7)
    values = rng.normal(size=(100, 2)) + 5.0
    labels = np.repeat([0, 1], 50)
    blda.update_statistics(torch.tensor(values, dtype=torch.float32), torch.tensor(labels))
    for c in range(2):
        np.testing.assert_allclose(
            blda.source.means[c, :, 0].numpy(), values[labels == c].mean(0), atol=1e-5
        )
        np.testing.assert_allclose(
            blda.source.variances[c, :, 0].numpy(), values[labels == c].var(0), rtol=1e-4
        )


def test_cell_samples_are_the_same_pixels_of_the_row_class():
    """Logit value = pixel id * C + column, so every sample names its pixel and column."""
    classes, per_class = 3, torch.tensor([70, 45, 20])
    labels = torch.repeat_interleave(torch.arange(classes), per_class)
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    pixels = labels.numel()
    ids = torch.arange(pixels, dtype=torch.float64)
    logits = (ids[None, :] * classes + torch.arange(classes)[:, None]).float()[None]  # (1, C, P)
    member = torch.ones(1, pixels, dtype=torch.bool)
    keys = pixel_keys(member.shape, torch.Generator().manual_seed(1), RankSync())
    samples = draw_cell_samples(logits, labels[None], member, keys, 30, None, RankSync())
    assert samples.per_cell == 45 and samples.rows.tolist() == [0, 1]
    assert samples.mask[:2].all() and not samples.mask[2].any()
    for c in (0, 1):
        drawn = samples.cells[c].double()
        pixel = torch.div(drawn, classes, rounding_mode="floor").long()
        assert (drawn - pixel * classes == torch.arange(classes)[:, None]).all()  # column l
        assert (pixel == pixel[0]).all()  # the same pixels in every column
        assert pixel[0].unique().numel() == 45 and (labels[pixel[0]] == c).all()
    anchors = class_balanced_anchors(samples)
    positive_pixel = torch.div(anchors[0].double(), classes, rounding_mode="floor").long()
    negative_column = anchors[1].double() % classes
    assert (anchors[0].double() % classes == labels[positive_pixel]).all()
    own = torch.repeat_interleave(torch.tensor([0, 1]), 45)
    assert (negative_column != own).all()


# --------------------------------------------------------------------------- domains, ignore


def test_mixed_image_weights_route_pixels_to_source_and_target():
    classes = 3
    logits, labels = make_batch(classes, seed=8, ignored=0.0)
    ones = torch.ones(labels.shape)
    released = BLDALoss(classes, min_samples=40)  # the mixed call never feeds the source set
    released.update_statistics(logits, labels, ones, domain="mixed")
    assert not released.source.fitted.any() and not released.anchors.fitted.any()
    source_only = BLDALoss(classes, min_samples=40, mixed_updates_source=True)
    source_only.update_statistics(logits, labels, ones, domain="mixed")
    assert source_only.source.fitted.all() and not source_only.target.fitted.any()
    assert source_only.anchors.fitted.all()
    target_only = BLDALoss(classes, min_samples=40)
    target_only.update_statistics(logits, labels, torch.full(labels.shape, 0.3), domain="mixed")
    assert target_only.target.fitted.all() and not target_only.source.fitted.any()
    zero = BLDALoss(classes, min_samples=40)
    zero.update_statistics(logits, labels, torch.zeros(labels.shape), domain="target")
    assert not zero.target.fitted.any() and int(zero.target.steps.max()) == 0
    blda = fitted_loss(classes)
    weights = torch.where(
        torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) < 0.5, 1.0, 0.6
    )
    mixed = blda.offsets(logits, labels, "mixed", weights)
    expected = torch.where(
        (weights == 1)[:, None],
        blda.offsets(logits, labels, "source"),
        blda.offsets(logits, labels, "target"),
    )
    assert torch.equal(mixed, expected)
    source_mode = fitted_loss(classes, mode="ola_source")
    assert source_mode.source.fitted.all() and not source_mode.target.fitted.any()
    assert (source_mode.offsets(logits, labels, "target") == 0).all()
    target_loss = source_mode(logits, labels, weights, "target", update=False)
    assert torch.equal(target_loss, reference_cross_entropy(logits, labels, weights))


def test_ignored_pixels_contribute_nothing():
    blda_a, blda_b = fitted_loss(3), fitted_loss(3)
    logits, labels = make_batch(3, seed=9)
    ignored = labels == IGNORE
    garbage = logits.clone()
    garbage.permute(0, 2, 3, 1)[ignored] = 1e3
    head = torch.rand(labels.shape)
    head_garbage = torch.where(ignored, -50.0, head)
    leaf_a, leaf_b = logits.clone().requires_grad_(True), garbage.clone().requires_grad_(True)
    loss_a = blda_a(leaf_a, labels, domain="source", regression=head)
    loss_b = blda_b(leaf_b, labels, domain="source", regression=head_garbage)
    assert torch.equal(loss_a, loss_b)
    for (name, a), b in zip(blda_a.state_dict().items(), blda_b.state_dict().values(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
    loss_b.backward()
    assert (leaf_b.grad.permute(0, 2, 3, 1)[ignored] == 0).all()
    loss_a.backward()
    assert torch.equal(leaf_a.grad, leaf_b.grad)


# --------------------------------------------------------------------------- regression (Eq. 10)


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_cdf_regression_target_and_loss_against_scipy(kind):
    classes = 3
    blda = fitted_loss(classes, regression_loss=kind, regression_weight=0.5, mode="ola")
    logits, labels = make_batch(classes, batch=1, height=6, width=5, seed=10)
    weights = torch.full(labels.shape, 0.4)
    head = torch.rand(1, 1, 6, 5, generator=torch.Generator().manual_seed(3))
    target, available = blda.regression_target(logits, labels, "target", weights)
    expected = np.zeros(labels.shape)
    for index in np.ndindex(*labels.shape):
        y = int(labels[index])
        if y == IGNORE:
            continue
        params = [
            p[y, y].numpy() for p in (blda.target.weights, blda.target.means, blda.target.variances)
        ]
        expected[index] = scipy_mixture_cdf(float(logits[index[0], y, index[1], index[2]]), *params)
    assert torch.equal(available, labels != IGNORE)
    np.testing.assert_allclose(target.double().numpy(), expected, atol=1e-6)
    error = head[:, 0].double().numpy() - expected
    per_pixel = error**2 if kind == "l2" else np.abs(error)
    regression = (0.4 * np.where(labels.numpy() != IGNORE, per_pixel, 0.0)).mean()
    loss = blda(logits, labels, weights, "target", regression=head, update=False)
    cross_entropy = reference_cross_entropy(
        logits - blda.tau * blda.offsets(logits, labels, "target"), labels, weights
    )
    assert float(blda.last_terms["regression"]) == pytest.approx(regression, rel=1e-5)
    assert float(loss) == pytest.approx(float(cross_entropy) + 0.5 * regression, rel=1e-5)


# --------------------------------------------------------------------------- state, shapes


def test_state_round_trip_continues_identically():
    classes = 4
    reference = BLDALoss(classes, min_samples=40, max_samples_per_cell=80, momentum_warmup=2)
    batches = [make_batch(classes, seed=20 + i) for i in range(6)]
    weights = torch.full(batches[0][1].shape, 0.7)

    def step(blda, logits, labels):
        first = blda(logits, labels, domain="source", regression=torch.sigmoid(logits[:, :1]))
        return first, blda(logits, labels, weights, domain="mixed")

    for logits, labels in batches[:3]:
        step(reference, logits, labels)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    buffer.seek(0)
    resumed = BLDALoss(classes, min_samples=40, max_samples_per_cell=80, momentum_warmup=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for logits, labels in batches[3:]:
        for a, b in zip(
            step(reference, logits, labels), step(resumed, logits, labels), strict=True
        ):
            assert torch.equal(a, b)
    assert int(resumed.iteration) == 12


def test_classification_inputs_equal_segmentation_layout():
    classes = 4
    logits, labels = make_batch(classes, batch=1, height=1, width=400, seed=11)
    flat_logits, flat_labels = logits[0, :, 0].t().contiguous(), labels[0, 0]
    a, b = fitted_loss(classes), fitted_loss(classes)
    head = torch.rand(400)
    loss_map = a(logits, labels, domain="source", regression=head.reshape(1, 1, 1, 400))
    loss_rows = b(flat_logits, flat_labels, domain="source", regression=head[:, None])
    assert torch.equal(loss_map, loss_rows)
    assert b.offsets(flat_logits, flat_labels).shape == (400, classes)


def test_bad_input_raises_blda_error():
    blda = BLDALoss(3)
    logits, labels = make_batch(3, seed=12)
    with pytest.raises(BLDAError, match="logits"):
        blda(logits[:, :2], labels)
    with pytest.raises(BLDAError, match="labels"):
        blda(logits, labels[:, :3])
    with pytest.raises(BLDAError, match="labels"):
        blda(logits, torch.where(labels == IGNORE, 7, labels))
    with pytest.raises(BLDAError, match="weights"):
        blda(logits, labels, domain="mixed")
    with pytest.raises(BLDAError, match="domain"):
        blda(logits, labels, domain="test")
    with pytest.raises(BLDAError, match="regression"):
        blda(logits, labels, regression=torch.zeros(2, 2, 24, 24))
    with pytest.raises(BLDAError, match="regression: mode 'none'"):
        BLDALoss(3, mode="none")(logits, labels, regression=torch.zeros(labels.shape))
    with pytest.raises(BLDAError, match="mode"):
        BLDALoss(3, mode="ola+cde")
    with pytest.raises(BLDAError, match="max_samples_per_cell"):
        BLDALoss(3, min_samples=1200)
    with pytest.raises(BLDAError, match="state_dict"):
        BLDALoss(4).load_state_dict(blda.state_dict())
    with pytest.raises(BLDAError, match="logits: contain NaN or infinite values at labelled"):
        BLDALoss(3, min_samples=40)(torch.full_like(logits, float("nan")), labels)


def test_one_nan_logit_is_always_refused_and_leaves_the_state_as_it_was():
    torch.manual_seed(0)
    loss = BLDALoss(3, min_samples=20, momentum_warmup=0, max_samples_per_cell=30)
    for _ in range(3):
        loss.update_statistics(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16)))
    for position in range(5):  # wherever it lies, whatever the sampling draws
        logits, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
        logits[1, 0, position, 5] = float("nan") if position % 2 else float("inf")
        before = {k: v.clone() for k, v in loss.state_dict().items() if torch.is_tensor(v)}
        with pytest.raises(BLDAError, match="logits: contain NaN or infinite values at labelled"):
            loss(logits, labels)
        after = loss.state_dict()
        assert all(torch.equal(value, after[key]) for key, value in before.items())


def test_mixture_set_moves_with_the_module():
    blda = BLDALoss(3).to(torch.float64)
    assert isinstance(blda.source, MixtureSet)
    assert blda.source.means.dtype == torch.float64 and blda.source.steps.dtype == torch.int64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_gives_what_cross_entropy_gives(reduction):
    # a last batch of a loader may be empty; torch's cross-entropy is the reference
    loss = BLDALoss(num_classes=4, reduction=reduction)
    for logits, labels in (
        (torch.randn(0, 4, 3, 5, requires_grad=True), torch.zeros(0, 3, 5, dtype=torch.int64)),
        (torch.randn(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.int64)),
    ):
        got = loss(logits, labels, domain="source")
        expected = F.cross_entropy(logits, labels, reduction=reduction)
        assert got.shape == expected.shape and got.requires_grad
        torch.testing.assert_close(got, expected, equal_nan=True)


def test_float64_logits_keep_float64_and_pass_gradcheck_at_tau_zero():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 3), generator=generator)
    labels[0, 0, 0] = 255
    loss = BLDALoss(4, tau=0.0)(logits, labels, domain="source")
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected / labels.numel(), rtol=1e-12)  # mean over all pixels
    assert torch.autograd.gradcheck(
        lambda x: BLDALoss(4, tau=0.0)(x, labels, domain="source"), (logits,)
    )
