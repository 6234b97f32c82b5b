"""Synthetic lesions: insertion, the two measures, and what restorations keep of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path
from cahal_bids.evaluation.lesions import (
    LesionSpec,
    evaluate_lesions,
    evaluate_real_lesions,
    find_real_lesions,
    insert_lesion,
    lesion_measures,
    lesion_table,
)
from cahal_bids.evaluation.protocol import cahal_method, trilinear


def _brain(shape=(48, 48, 48)):
    grids = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grids))
    truth = np.where(radius < 20, 100.0, 0.0).astype(np.float32)
    return truth, radius < 20


def test_inserted_lesion_has_the_asked_contrast_and_the_truth_measures_one():
    truth, _ = _brain()
    lesioned, mask, shell = insert_lesion(truth, (24, 24, 24), LesionSpec((4.0, 4.0, 3.0), 0.5))
    assert mask.sum() == pytest.approx(4 / 3 * np.pi * 4 * 4 * 3, rel=0.15)
    assert not (mask & shell).any()
    assert float(lesioned[24, 24, 24]) == pytest.approx(150.0, rel=0.02)
    measures = lesion_measures(lesioned, lesioned, mask, shell)
    assert measures['contrast_ratio'] == pytest.approx(1.0)
    assert measures['volume_ratio'] == pytest.approx(1.0)


def test_erased_and_blurred_lesions_score_below_one():
    truth, _ = _brain()
    lesioned, mask, shell = insert_lesion(truth, (24, 24, 24), LesionSpec((3.0, 3.0, 3.0), -0.4))
    erased = lesion_measures(truth, lesioned, mask, shell)
    assert erased['contrast_ratio'] == pytest.approx(0.0, abs=1e-6)
    assert erased['volume_ratio'] == 0.0
    from scipy import ndimage

    blurred = lesion_measures(ndimage.gaussian_filter(lesioned, 2.0), lesioned, mask, shell)
    assert 0 < blurred['contrast_ratio'] < 1


def test_evaluate_lesions_rows_and_table():
    truth, brain = _brain((64, 64, 64))
    brain = brain & (np.sqrt(sum(g**2 for g in np.meshgrid(
        *(np.arange(64) - 31.5,) * 3, indexing='ij'))) < 14)  # fmt: skip
    rows = evaluate_lesions(truth, brain, subject='phantom', methods={'trilinear': trilinear},
                            cells=('V4A1',), placements=1, seed=3)  # fmt: skip
    assert len(rows) == 3  # three default lesions x one cell x one method
    assert all(0 < row['contrast_ratio'] < 1.05 for row in rows)
    table = lesion_table(rows)
    assert table.splitlines()[0] == '| method | V4A1 contrast / volume |'
    assert table.splitlines()[2].startswith('| trilinear | ')


def _lesioned_brain():
    rng = np.random.default_rng(0)
    truth, brain = _brain((64, 64, 64))
    truth = truth + rng.normal(0, 2.0, truth.shape).astype(np.float32) * brain
    lesioned, big, _ = insert_lesion(truth, (26, 30, 32), LesionSpec((4.0, 4.0, 3.0), 0.6))
    lesioned, small, _ = insert_lesion(lesioned, (40, 34, 30), LesionSpec((2.0, 2.0, 2.0), 0.6))
    return lesioned, brain, big, small


def test_real_lesions_are_found_by_threshold_largest_first():
    lesioned, brain, big, small = _lesioned_brain()
    lesions = find_real_lesions(lesioned, brain)
    assert [lesion.index for lesion in lesions] == [0, 1]
    assert lesions[0].voxels > lesions[1].voxels
    found = np.zeros(lesioned.shape, dtype=bool)
    found[lesions[0].box] = lesions[0].mask
    overlap = (found & big).sum() / big.sum()
    assert overlap > 0.8
    assert not (lesions[0].mask & lesions[0].shell).any()
    # a lesion-free brain (noise only) yields nothing; neither does an empty mask
    truth, brain = _brain((64, 64, 64))
    assert find_real_lesions(truth, brain) == []
    assert find_real_lesions(lesioned, np.zeros_like(brain)) == []


def test_real_lesions_are_measured_per_method_and_cell():
    lesioned, brain, _, _ = _lesioned_brain()
    rows = evaluate_real_lesions(
        lesioned, brain, subject='phantom', methods={'trilinear': trilinear}, cells=('V4A1',)
    )
    assert [row['lesion'] for row in rows] == [0, 1]
    assert all(0 < row['contrast_ratio'] < 1.05 for row in rows)
    assert rows[0]['lesion_voxels'] > rows[1]['lesion_voxels']
    # the small lesion loses more of its contrast to a thick-slice acquisition
    assert rows[1]['contrast_ratio'] < rows[0]['contrast_ratio']


@pytest.mark.slow
@pytest.mark.parametrize('modality', ['T1w', 'FLAIR'])
def test_shipped_zoos_keep_lesions_at_least_as_well_as_the_reference(modality, one_thread):
    try:
        zoo = Zoo.open(default_zoo_path(modality))
    except ZooError as error:
        pytest.skip(str(error))
    from cahal_bids.engine.inference import Enhancer

    rng = np.random.default_rng(0)
    shape = (96, 96, 96)
    grids = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grids))
    # a head-like phantom with texture, so the experts see something brain-like
    texture = np.asarray(
        __import__('scipy').ndimage.gaussian_filter(rng.normal(0, 1, shape), 2.0), np.float32
    )
    truth = np.where(radius < 40, 70.0 + 60.0 * texture, 0.0).astype(np.float32).clip(0)
    enhancer = Enhancer(zoo, device=torch.device('cpu'))
    rows = evaluate_lesions(
        truth, radius < 36, subject='phantom',
        methods={'trilinear': trilinear, 'cahal': cahal_method(enhancer)},
        cells=('V4A1',), placements=2, seed=1,
    )  # fmt: skip
    for measure in ('contrast_ratio', 'volume_ratio'):
        ours = np.nanmean([r[measure] for r in rows if r['method'] == 'cahal'])
        reference = np.nanmean([r[measure] for r in rows if r['method'] == 'trilinear'])
        assert ours >= reference - 0.05, (modality, measure, ours, reference)
