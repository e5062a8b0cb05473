"""Batched 1-D Gaussian mixtures: EM from samples or histograms, the momentum update of
Algorithm 1, CDF, density, inverse CDF, save and load.

Every parameter is a tensor of shape ``(*batch_shape, K)``: one mixture per cell (for example the
C x C logit sets M_cl of Eq. 3), all fitted at once: Python loops run only over blocks of cells
(to keep the E step's work tensor in cache) and over the K components, never over samples.

Typical online use (Algorithm 1, lines 9-17)::

    clock = StepsSinceUpdate(gmm.batch_shape)
    ...  # every training iteration:
    n = clock.tick()
    new = gmm.em_step(samples, mask=mask, n_steps=3)       # T EM steps from the last estimate
    gmm.momentum_update(new, 0.99, n, new.updated_)
    clock.reset(new.updated_)

Modules: `normal` (normal and mixture CDF / density), `em` (initialisations and EM steps on flat
cells), `evaluation` (CDF, density, inverse CDF and sampling of a fitted mixture), `mixture`
(`GaussianMixture1D`: settings, state, fitting, momentum update) and `tracking`
(`StepsSinceUpdate`).
"""

from __future__ import annotations

from blda_tools.gmm.em import CHUNK_ELEMENTS, INITS, LLOYD_ITERATIONS, RESPONSIBILITY_EPSILON
from blda_tools.gmm.mixture import FORMAT, FORMAT_VERSION, GaussianMixture1D
from blda_tools.gmm.normal import (
    CDF_METHODS,
    mixture_cdf,
    mixture_log_pdf,
    mixture_pdf,
    normal_cdf_abramowitz_stegun,
)
from blda_tools.gmm.tracking import StepsSinceUpdate

__all__ = [
    "CDF_METHODS",
    "CHUNK_ELEMENTS",
    "FORMAT",
    "FORMAT_VERSION",
    "INITS",
    "LLOYD_ITERATIONS",
    "RESPONSIBILITY_EPSILON",
    "GaussianMixture1D",
    "StepsSinceUpdate",
    "mixture_cdf",
    "mixture_log_pdf",
    "mixture_pdf",
    "normal_cdf_abramowitz_stegun",
]
