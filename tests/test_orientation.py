"""Lossless RAS reorientation (cahal_bids.core.orientation), with property tests."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.orientations import apply_orientation

from cahal_bids.core.orientation import Reorientation

PERMUTATIONS = list(itertools.permutations(range(3)))


@st.composite
def oriented_images(draw, make_affine):
    """(affine, shape, world_axes, signs): random permutation, flips, oblique rotation, shift.

    Rotations stay below 45 degrees, so the closest world axis of each voxel axis is
    still the one it was built along.
    """
    world_axes = draw(st.sampled_from(PERMUTATIONS))
    signs = tuple(draw(st.sampled_from((-1, 1))) for _ in range(3))
    sizes = tuple(draw(st.floats(0.3, 6.0)) for _ in range(3))
    axis = [draw(st.floats(-1.0, 1.0)) for _ in range(3)]
    if np.linalg.norm(axis) < 0.1:
        axis = [0.0, 0.0, 1.0]
    degrees = draw(st.floats(-40.0, 40.0))
    shift = tuple(draw(st.floats(-200.0, 200.0)) for _ in range(3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(3))
    affine = make_affine(sizes, world_axes, signs, degrees, axis, shift)
    return affine, shape, world_axes, signs


def _homogeneous(indices: np.ndarray) -> np.ndarray:
    """(3, ...) voxel indices to (4, N) homogeneous columns."""
    flat = indices.reshape(3, -1).astype(np.float64)
    return np.vstack([flat, np.ones((1, flat.shape[1]))])


@settings(max_examples=80, deadline=None)
@given(draw=st.data())
def test_round_trip_is_exact_numpy(make_affine, draw):
    case = draw.draw(oriented_images(make_affine))
    affine, shape, _, _ = case
    reo = Reorientation.from_affine(affine, shape)
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    ras = reo.to_ras(data)
    assert ras.shape == reo.ras_shape
    assert ras.flags.c_contiguous
    np.testing.assert_array_equal(reo.from_ras(ras), data)
    np.testing.assert_array_equal(ras, apply_orientation(data, reo.ornt))


@settings(max_examples=40, deadline=None)
@given(draw=st.data())
def test_round_trip_is_exact_torch_with_leading_axes(make_affine, draw):
    case = draw.draw(oriented_images(make_affine))
    affine, shape, _, _ = case
    reo = Reorientation.from_affine(affine, shape)
    data = torch.rand((2, 1, *shape), generator=torch.Generator().manual_seed(0))
    ras = reo.to_ras(data)
    assert isinstance(ras, torch.Tensor) and ras.is_contiguous()
    assert tuple(ras.shape) == (2, 1, *reo.ras_shape)
    assert torch.equal(reo.from_ras(ras), data)
    expected = reo.to_ras(data[1, 0].numpy())
    np.testing.assert_array_equal(ras[1, 0].numpy(), expected)


@settings(max_examples=80, deadline=None)
@given(draw=st.data())
def test_world_coordinates_of_every_voxel_are_preserved(make_affine, draw):
    case = draw.draw(oriented_images(make_affine))
    affine, shape, _, _ = case
    reo = Reorientation.from_affine(affine, shape)
    original_index = reo.to_ras(np.indices(shape))  # (3, *ras_shape): where each voxel came from
    world_before = affine @ _homogeneous(original_index)
    world_after = reo.ras_affine @ _homogeneous(np.indices(reo.ras_shape))
    np.testing.assert_allclose(world_after, world_before, atol=1e-9, rtol=0)


@settings(max_examples=80, deadline=None)
@given(draw=st.data())
def test_ras_affine_is_ras_and_axes_follow_the_construction(make_affine, draw):
    case = draw.draw(oriented_images(make_affine))
    affine, shape, world_axes, signs = case
    reo = Reorientation.from_affine(affine, shape)
    assert nib.aff2axcodes(reo.ras_affine) == ('R', 'A', 'S')
    for source_axis in range(3):
        ras_axis = world_axes[source_axis]
        assert reo.ras_axes[ras_axis] == source_axis
        assert reo.flipped_in_ras[ras_axis] == (signs[source_axis] < 0)
    assert reo.source_code == ''.join(nib.aff2axcodes(affine))
    # per-axis helpers: shapes and voxel sizes follow the axes, and invert exactly
    sizes = tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    np.testing.assert_allclose(
        reo.sizes_to_ras(sizes), np.sqrt((reo.ras_affine[:3, :3] ** 2).sum(axis=0))
    )
    assert reo.sizes_to_ras(shape) == reo.ras_shape
    assert reo.sizes_from_ras(reo.sizes_to_ras(sizes)) == sizes
    assert reo.sizes_to_ras(reo.sizes_from_ras(shape)) == shape
    assert reo.is_identity == (reo.ras_axes == (0, 1, 2) and not any(reo.flipped_in_ras))


def test_ras_input_is_identity():
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    reo = Reorientation.from_affine(affine, (4, 5, 6))
    assert reo.is_identity
    assert reo.source_code == 'RAS'
    np.testing.assert_array_equal(reo.ras_affine, affine)
    data = np.arange(120.0).reshape(4, 5, 6)
    np.testing.assert_array_equal(reo.to_ras(data), data)


def test_lps_and_permuted_codes(make_affine):
    lps = Reorientation.from_affine(np.diag([-1.0, -1.0, 1.0, 1.0]), (2, 3, 4))
    assert lps.source_code == 'LPS'
    assert lps.ras_axes == (0, 1, 2) and lps.flipped_in_ras == (True, True, False)
    # sagittal acquisition whose voxel axes point Posterior, Inferior, Right
    pir = make_affine((1.0, 1.0, 5.0), world_axes=(1, 2, 0), signs=(-1, -1, 1))
    reo = Reorientation.from_affine(pir, (6, 7, 3))
    assert reo.source_code == 'PIR'
    assert reo.ras_axes == (2, 0, 1)
    assert reo.flipped_in_ras == (False, True, True)
    assert reo.ras_shape == (3, 6, 7)
    assert reo.sizes_to_ras((1.0, 1.0, 5.0)) == (5.0, 1.0, 1.0)


def test_any_grid_with_the_same_axes_can_be_reoriented():
    """Only axis order and directions matter: a resampled array goes back the same way."""
    reo = Reorientation.from_affine(np.diag([-1.0, 1.0, 2.0, 1.0]), (2, 3, 4))
    other = np.arange(5 * 6 * 7.0).reshape(5, 6, 7)
    np.testing.assert_array_equal(reo.to_ras(other), other[::-1])
    np.testing.assert_array_equal(reo.from_ras(reo.to_ras(other)), other)


def test_bad_arrays_and_affines_are_refused():
    reo = Reorientation.from_affine(np.diag([-1.0, 1.0, 2.0, 1.0]), (2, 3, 4))
    with pytest.raises(ValueError, match='at least 3'):
        reo.to_ras(np.zeros((3, 2)))
    with pytest.raises(ValueError, match='at least 3'):
        reo.from_ras(torch.zeros(4, 3))
    with pytest.raises(ValueError, match='3 per-axis'):
        reo.sizes_to_ras((1.0, 2.0))
    with pytest.raises(ValueError, match='singular'):
        Reorientation.from_affine(np.diag([1.0, 0.0, 1.0, 1.0]), (2, 2, 2))
    with pytest.raises(ValueError, match='finite 4x4'):
        Reorientation.from_affine(np.full((4, 4), np.nan), (2, 2, 2))
    with pytest.raises(ValueError, match='shape'):
        Reorientation.from_affine(np.eye(4), (2, 2))
