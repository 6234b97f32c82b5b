"""The project's SSIM and Dice against the field's references: scikit-image and MONAI.

The project keeps its own few lines for each measure, for reasons the references do not
cover: the evaluation averages SSIM inside the head mask (scikit-image averages the whole
image less a border), Dice is reported per named tissue class with ``nan`` for a class
found in neither map, and neither library is a runtime dependency (MONAI alone is larger
than the package). These tests pin each implementation to the reference on synthetic
arrays, isolate every difference of definition, and compare where the two must agree:

- ``evaluation.protocol.ssim``: scikit-image's ``structural_similarity`` with Wang et al.'s
  settings (Gaussian weights, sigma 1.5, population covariances), except that the project's
  Gaussian is truncated at scipy's default 4 sigma (13 taps) where scikit-image's stops at
  3.5 sigma (11 taps), and that the map is averaged inside a mask;
- ``core.metrics.dice_per_class`` and ``evaluation.protocol.tissue_measures``: MONAI's
  ``compute_dice``/``DiceMetric`` on one-hot maps, with the conventions for empty classes
  stated below;
- ``training.losses.soft_dice``: one minus MONAI's ``DiceLoss`` with ``squared_pred=True``
  and the same smoothing in numerator and denominator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, compute_dice
from skimage.metrics import structural_similarity

from cahal_bids.core.metrics import dice_per_class
from cahal_bids.evaluation.protocol import ssim, tissue_measures
from cahal_bids.training.losses import soft_dice

SKIMAGE_TRUNCATE = 3.5
"""scikit-image truncates the SSIM Gaussian here (11 taps at sigma 1.5, Wang et al.)."""
SKIMAGE_BORDER = 5
"""Voxels scikit-image leaves out at every face before averaging: (11 - 1) / 2."""


def _pair(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 3D 'truth' in [0, 1] and a noisy, slightly blurred estimate of it."""
    rng = np.random.default_rng(seed)
    truth = scipy.ndimage.gaussian_filter(rng.random((22, 24, 20)), 2.0)
    truth = (truth - truth.min()) / (truth.max() - truth.min())
    estimate = scipy.ndimage.gaussian_filter(truth, 0.7) + rng.normal(0, noise, truth.shape)
    return truth, estimate


def _skimage_ssim(truth: np.ndarray, estimate: np.ndarray, data_range: float):
    """scikit-image's mean SSIM and SSIM map with Wang et al.'s settings."""
    return structural_similarity(
        truth,
        estimate,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )


def _interior(shape: tuple[int, ...], border: int = SKIMAGE_BORDER) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(border, n - border) for n in shape)] = True
    return mask


@pytest.mark.parametrize(('noise', 'data_range'), [(0.01, 1.0), (0.05, 1.0), (0.2, 2.5)])
def test_ssim_is_scikit_image_with_the_same_window(noise, data_range, monkeypatch):
    """With scikit-image's 3.5-sigma window, the project's map is scikit-image's map: the
    mean over scikit-image's interior is its mean SSIM, and over any mask the map's mean."""
    truth, estimate = _pair(noise)
    reference, reference_map = _skimage_ssim(truth, estimate, data_range)
    calls: list[float] = []
    original = scipy.ndimage.gaussian_filter

    def skimage_window(image, sigma, **options):
        calls.append(sigma)
        return original(image, sigma, truncate=SKIMAGE_TRUNCATE, **options)

    monkeypatch.setattr(scipy.ndimage, 'gaussian_filter', skimage_window)
    inside = ssim(truth, estimate, _interior(truth.shape), data_range)
    assert calls == [1.5] * 5  # the window really was the patched one
    assert inside == pytest.approx(reference, rel=1e-12, abs=1e-12)
    mask = np.random.default_rng(1).random(truth.shape) < 0.3
    assert ssim(truth, estimate, mask, data_range) == pytest.approx(
        reference_map[mask].mean(), rel=1e-12, abs=1e-12
    )


@pytest.mark.parametrize('noise', [0.01, 0.05, 0.2])
def test_ssim_differs_from_scikit_image_only_by_the_window_tail(noise):
    """As shipped (4-sigma window), the project's SSIM stays within 1e-3 of scikit-image's:
    the Gaussian mass between 3.5 and 4 sigma is below 5e-4 per axis."""
    truth, estimate = _pair(noise)
    reference, _ = _skimage_ssim(truth, estimate, 1.0)
    ours = ssim(truth, estimate, _interior(truth.shape), 1.0)
    assert ours == pytest.approx(reference, abs=1e-3)
    assert ssim(truth, truth, _interior(truth.shape), 1.0) == pytest.approx(1.0)


# ---------------------------------------------------------------- Dice


def _one_hot(labels: np.ndarray, classes: int = 4) -> torch.Tensor:
    """(1, classes, *shape) float one-hot map, MONAI's layout."""
    tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(tensor, classes).movedim(-1, 0)[None].float()


def _labels(seed: int, shape=(14, 15, 16), flip: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Nested-shell tissue labels 0-3 and a copy with a fraction ``flip`` of voxels relabelled."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing='ij')
    radius = np.sqrt(sum(axis**2 for axis in grid))
    truth = 3 - np.digitize(radius, [0.4, 0.7, 0.95])  # 3 (WM) inside to 0 outside
    estimate = np.where(rng.random(shape) < flip, rng.integers(0, 4, shape), truth)
    return truth, estimate


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('flip', [0.05, 0.5, 1.0])
def test_dice_per_class_is_monai_compute_dice(seed, flip):
    truth, estimate = _labels(seed, flip=flip)
    ours = dice_per_class(estimate, truth, n_classes=4)
    theirs = compute_dice(_one_hot(estimate), _one_hot(truth), include_background=True)
    assert theirs.shape == (1, 4) and set(ours) == {0, 1, 2, 3}
    np.testing.assert_allclose([ours[k] for k in range(4)], theirs[0].double(), rtol=1e-6)
    metric = DiceMetric(include_background=True, reduction='none')
    metric(_one_hot(estimate), _one_hot(truth))
    np.testing.assert_allclose([ours[k] for k in range(4)], metric.aggregate()[0], rtol=1e-6)


def test_dice_per_class_empty_classes_follow_monai_ignore_empty_false_except_when_absent():
    """Where the truth lacks a class, MONAI's default (``ignore_empty=True``) gives ``nan``.

    The project instead scores a class the estimate invents 0, as MONAI does with
    ``ignore_empty=False``; a class absent from both maps is ``nan`` (MONAI with
    ``ignore_empty=False`` calls that a perfect 1), so averages skip it.
    """
    truth = np.zeros((6, 6, 6), dtype=np.int64)
    truth[:3] = 1  # classes 0 and 1 only
    estimate = truth.copy()
    estimate[0, 0, :2] = 2  # class 2 invented, class 3 in neither map
    ours = dice_per_class(estimate, truth, n_classes=4)
    strict = compute_dice(_one_hot(estimate), _one_hot(truth), ignore_empty=False)[0]
    default = compute_dice(_one_hot(estimate), _one_hot(truth))[0]
    for label in (0, 1):  # present in the truth: all three agree
        assert ours[label] == pytest.approx(float(strict[label]), rel=1e-6)
        assert ours[label] == pytest.approx(float(default[label]), rel=1e-6)
    assert ours[2] == 0.0 == float(strict[2]) and math.isnan(default[2])
    assert math.isnan(ours[3]) and float(strict[3]) == 1.0 and math.isnan(default[3])


@pytest.mark.parametrize('seed', [0, 3])
def test_tissue_dice_is_monai_inside_the_mask(seed):
    """Tissue Dice (label >= 1, inside the head mask, classes the truth lacks left out) is
    MONAI's foreground Dice on the masked voxels, which scores those classes ``nan``."""
    truth, estimate = _labels(seed, flip=0.4)
    truth[truth == 2] = 1  # the truth lacks GM: left out by the project, nan for MONAI
    mask = np.random.default_rng(seed).random(truth.shape) < 0.7
    names = ['background', 'CSF', 'GM', 'WM']
    ours, _ = tissue_measures(truth, estimate, mask, names)
    theirs = compute_dice(
        _one_hot(estimate[mask]), _one_hot(truth[mask]), include_background=False
    )[0]
    assert set(ours) == {'CSF', 'WM'} and math.isnan(theirs[1])
    assert ours['CSF'] == pytest.approx(float(theirs[0]), rel=1e-6)
    assert ours['WM'] == pytest.approx(float(theirs[2]), rel=1e-6)


@pytest.mark.parametrize('smooth', [1e-5, 1.0])
def test_soft_dice_is_one_minus_monai_squared_dice_loss(smooth):
    generator = torch.Generator().manual_seed(4)
    first = torch.softmax(torch.randn(2, 4, 5, 6, 7, generator=generator), dim=1)
    second = torch.softmax(3 * torch.randn(2, 4, 5, 6, 7, generator=generator), dim=1)
    loss = DiceLoss(squared_pred=True, smooth_nr=smooth, smooth_dr=smooth, reduction='none')
    expected = 1 - loss(first, second).reshape(2, 4)
    torch.testing.assert_close(soft_dice(first, second, smooth=smooth), expected)


def test_soft_dice_on_hard_maps_is_monai_hard_dice():
    truth, estimate = _labels(5, flip=0.3)
    ours = soft_dice(_one_hot(estimate), _one_hot(truth), smooth=1e-9)
    theirs = compute_dice(_one_hot(estimate), _one_hot(truth), include_background=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
