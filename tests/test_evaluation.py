"""The evaluation protocol on a small phantom."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cahal_bids.engine.inference import Enhancer
from cahal_bids.engine.zoo import Zoo
from cahal_bids.evaluation.protocol import (
    acquire,
    cubic_bspline,
    data_consistency,
    evaluate_volume,
    markdown_tables,
    psnr,
    summarize,
    trilinear,
)

pytestmark = pytest.mark.usefixtures('one_thread')


def _phantom(shape=(30, 34, 28)):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grid))
    image = np.where(radius < 0.9, 0.5, 0.0) + np.where(radius < 0.5, 0.5, 0.0)
    image = image + 0.1 * np.sin(5 * grid[2]) * (radius < 0.9)
    return image.astype(np.float32), radius < 0.9


def test_metrics_on_hand_made_cases():
    truth, mask = _phantom()
    assert psnr(truth, truth, mask, 1.0) == math.inf
    noisy = truth + 0.1
    assert psnr(truth, noisy, mask, 1.0) == pytest.approx(20.0)


def test_baselines_reproduce_smooth_signals_and_are_consistent():
    truth, mask = _phantom()
    resolution = (1.0, 1.0, 4.0)
    low, affine = acquire(truth, np.eye(4), resolution)
    assert low.shape == (30, 34, 7)
    np.testing.assert_allclose(affine[:3, 3], [0.0, 0.0, 1.5])  # corner shared with the truth
    for method in (trilinear, cubic_bspline):
        estimate = method(low, affine, resolution, truth.shape)
        assert estimate.shape == truth.shape
        assert psnr(truth, estimate, mask, 1.0) > 15
    # the reference is exactly the degradation model's trilinear return to 1 mm
    from cahal_bids.physics.degradation import degrade

    expected = degrade(torch.from_numpy(truth).double(), resolution).float().numpy()
    np.testing.assert_allclose(
        trilinear(low, affine, resolution, truth.shape), expected, atol=1e-5
    )
    # acquiring the truth again gives exactly the acquired image
    assert data_consistency(truth, low, mask, resolution, 1.0) < 1e-6


def test_protocol_with_an_identity_zoo(make_zoo):
    truth, mask = _phantom()
    enhancer = Enhancer(
        Zoo.open(make_zoo('identity', head_scale=0.0)),
        device=torch.device('cpu'),
        consistency_projection='off',  # the expert alone: exactly trilinear
    )
    cells = ['V2A3', 'V5A1']
    cases = evaluate_volume(
        truth, mask, np.eye(4), subject='phantom', enhancer=enhancer, cells=cells, realizations=2
    )
    assert len(cases) == 2 * 2 * 3
    by_key = {(c.cell, c.realization, c.method): c for c in cases}
    for cell in cells:
        for realization in range(2):
            reference = by_key[(cell, realization, 'trilinear')]
            identity = by_key[(cell, realization, 'cahal')]
            # an identity expert returns exactly the network input: the trilinear image
            assert identity.psnr == pytest.approx(reference.psnr, abs=1e-4)
    again = evaluate_volume(
        truth, mask, np.eye(4), subject='phantom', enhancer=None, cells=cells, realizations=2
    )
    assert [c.resolution for c in again] == [c.resolution for c in cases if c.method != 'cahal']
    summary = summarize(cases)
    assert set(summary['by_bin']) == {'V2', 'V5', 'overall'}
    assert summary['by_bin']['overall']['cahal']['n'] == 4
    table = markdown_tables(summary)
    assert '| trilinear |' in table and '| V5A1 |' in table


def test_flat_regions_are_left_alone_by_an_identity_expert(make_zoo):
    from cahal_bids.engine.inference import Enhancer
    from cahal_bids.engine.zoo import Zoo
    from cahal_bids.evaluation.flat_regions import flat_images, flat_region_changes

    images = flat_images((40, 36, 12))
    assert set(images) == {'constant', 'two halves', 'ramp'}
    assert all(image.shape == (40, 36, 12) for image in images.values())
    enhancer = Enhancer(
        Zoo.open(make_zoo('identity', head_scale=0.0)),
        device=torch.device('cpu'),
        precision='fp32',
    )
    changes = flat_region_changes(enhancer, (40, 36, 12))
    assert set(changes) == set(images)  # every flat image was restored and measured
    for change in changes.values():
        assert set(change) == {'mean_percent', 'p95_percent', 'max_percent'}
        assert change['max_percent'] < 1e-3, changes
    # the measure sees what an expert adds: random heads change every flat image
    noisy = Enhancer(
        Zoo.open(make_zoo('random', head_scale=0.05)),
        device=torch.device('cpu'),
        precision='fp32',
    )
    added = flat_region_changes(noisy, (40, 36, 12))
    assert set(added) == set(images)
    assert all(change['mean_percent'] > 0.1 for change in added.values()), added
