"""The compiled label pass of `BLDALoss` (valid pixels, ignored labels as 0, the range check)
against the same rule in torch ops, and the error a bad label gets."""

from __future__ import annotations

import pytest
import torch

from blda_tools.errors import BLDAError
from blda_tools.online.kernel import label_fields
from blda_tools.online.loss import BLDALoss


@pytest.mark.parametrize(
    ("shape", "classes", "ignore_index"),
    [((2, 37, 41), 19, 255), ((500,), 3, 255), ((3, 8, 8), 5, -1), ((4, 4), 6, 0), ((0,), 2, 255)],
)
def test_label_fields_match_torch(shape, classes, ignore_index):
    generator = torch.Generator().manual_seed(classes)
    labels = torch.randint(0, classes, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.2] = ignore_index
    valid, clean, out_of_range = label_fields(labels, ignore_index, classes)
    expected_valid = labels != ignore_index
    assert torch.equal(valid, expected_valid)
    assert torch.equal(clean, torch.where(expected_valid, labels, 0))
    assert not out_of_range


@pytest.mark.parametrize("bad", [-2, 19, 254, 1 << 40])
def test_label_fields_flag_labels_outside_the_classes(bad):
    labels = torch.zeros(3, 5, 7, dtype=torch.int64)
    labels[1, 2, 3] = bad
    labels[0, 0, 0] = 255
    assert label_fields(labels, 255, 19)[2]
    assert label_fields(labels.transpose(1, 2), 255, 19)[2]  # not contiguous
    with pytest.raises(BLDAError, match="labels: values must lie in"):
        BLDALoss(19)(torch.zeros(3, 19, 5, 7), labels)
