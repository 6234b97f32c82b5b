"""The noise level of an acquired image (:mod:`cahal_bids.core.noise`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cahal_bids.core.noise import estimate_noise_sd


def _anatomy(shape=(64, 64, 16), seed=0):
    """Smooth blobs with sharp tissue edges, thick last axis."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), (4, 4, 1))
    return np.where(field > 0, 100.0, 60.0) + 20.0 * field


@pytest.mark.parametrize('sd', [1.0, 3.0, 6.0])
def test_the_noise_of_tissue_is_found_despite_its_edges(sd):
    clean = _anatomy()
    noisy = clean + np.random.default_rng(1).normal(0.0, sd, clean.shape)
    found = estimate_noise_sd(noisy, (1.0, 1.0, 4.0), clean > 30.0)
    assert found == pytest.approx(sd, rel=0.15)
    # anatomy alone reads as far less noise than any of these levels
    assert estimate_noise_sd(clean, (1.0, 1.0, 4.0), clean > 30.0) < 0.5


def test_zeros_around_a_skull_stripped_head_do_not_lower_the_estimate():
    clean = _anatomy()
    noisy = clean + np.random.default_rng(2).normal(0.0, 3.0, clean.shape)
    stripped = noisy.copy()
    stripped[:, :24] = 0.0  # a third of the image is background set to zero
    assert estimate_noise_sd(stripped, (1.0, 1.0, 4.0)) == pytest.approx(3.0, rel=0.15)


def test_the_slices_are_cut_along_the_thickest_axis():
    """Slice-to-slice change along a thick axis is anatomy, never noise."""
    rng = np.random.default_rng(3)
    volume = np.repeat(rng.uniform(50.0, 150.0, (1, 1, 12)), 40, axis=0).repeat(40, axis=1)
    volume = np.moveaxis(volume, 2, 0)  # thick axis first: every slice is flat
    assert estimate_noise_sd(volume, (5.0, 1.0, 1.0)) == pytest.approx(0.0, abs=1e-9)
    noisy = volume + np.random.default_rng(4).normal(0.0, 2.0, volume.shape)
    assert estimate_noise_sd(noisy, (5.0, 1.0, 1.0)) == pytest.approx(2.0, rel=0.15)


def test_too_little_tissue_is_unknown_and_bad_arguments_raise():
    volume = np.zeros((20, 20, 4))
    volume[:4, :4] = 100.0
    assert estimate_noise_sd(volume, (1.0, 1.0, 3.0)) is None
    with pytest.raises(ValueError, match='3D volume'):
        estimate_noise_sd(np.zeros((4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match='does not match'):
        estimate_noise_sd(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), np.ones((4, 4, 3), bool))
    with pytest.raises(ValueError, match='flat_fraction'):
        estimate_noise_sd(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), flat_fraction=0.0)
