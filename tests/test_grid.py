"""The native 1 mm grid contract and resampling onto it (cahal_bids.core.grid)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cahal_bids.core.grid import (
    NativeGrid,
    axis_operator,
    native_grid,
    native_shape,
    resample_image_to_native_grid,
    resample_to_native_grid,
)
from cahal_bids.core.orientation import Reorientation

ATOL_MM = 1e-6

# (zooms, world_axes, signs, degrees, rotation axis): axis-aligned, flipped (LPS),
# permuted and flipped (PIR sagittal), oblique, oblique + permuted + flipped.
GEOMETRIES = {
    'ras': ((1.0, 1.0, 3.0), (0, 1, 2), (1, 1, 1), 0.0, (0, 0, 1)),
    'lps': ((0.9, 1.2, 4.0), (0, 1, 2), (-1, -1, 1), 0.0, (0, 0, 1)),
    'pir': ((1.0, 1.0, 5.0), (1, 2, 0), (-1, -1, 1), 0.0, (0, 0, 1)),
    'oblique': ((1.3, 0.7, 2.5), (0, 1, 2), (1, 1, 1), 25.0, (1, 2, 3)),
    'oblique-flipped': ((2.0, 0.5, 3.3), (2, 0, 1), (-1, 1, -1), -35.0, (3, -1, 2)),
}
SHAPES = {'ras': (6, 7, 5), 'lps': (7, 5, 4), 'pir': (5, 6, 3), 'oblique': (5, 8, 4)}


def _affine(make_affine, key: str) -> np.ndarray:
    zooms, world_axes, signs, degrees, axis = GEOMETRIES[key]
    return make_affine(zooms, world_axes, signs, degrees, axis, shift=(-12.5, 30.0, 7.25))


def _shape(key: str) -> tuple[int, int, int]:
    return SHAPES.get(key, (4, 9, 5))


def _sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World coordinates of voxel positions ``index`` (N, 3)."""
    return index @ affine[:3, :3].T + affine[:3, 3]


# --- the grid contract -----------------------------------------------------------------


@pytest.mark.parametrize('key', GEOMETRIES)
def test_grid_contract(make_affine, key):
    affine = _affine(make_affine, key)
    shape = _shape(key)
    grid = native_grid(shape, affine)
    sizes = _sizes(affine)
    direction = affine[:3, :3] / sizes

    assert isinstance(grid, NativeGrid)
    # round half up, on the nominal voxel sizes (several of these extents are exact halves
    # that rotation turns into x.4999999: the rounding tolerance must still round them up)
    zooms = GEOMETRIES[key][0]
    assert grid.shape == tuple(
        max(1, math.floor(n * z + 0.5 + 1e-9)) for n, z in zip(shape, zooms, strict=True)
    )
    np.testing.assert_allclose(grid.voxel_sizes, (1.0, 1.0, 1.0), atol=1e-12)
    np.testing.assert_allclose(grid.direction, direction, atol=1e-12)
    np.testing.assert_allclose(grid.affine[:3, :3], direction, atol=1e-12)
    np.testing.assert_array_equal(grid.affine[3], (0, 0, 0, 1))

    corner = _world(affine, np.array([[-0.5, -0.5, -0.5]]))[0]
    np.testing.assert_allclose(grid.corner, corner, atol=ATOL_MM)
    np.testing.assert_allclose(
        _world(grid.affine, np.array([[-0.5, -0.5, -0.5]]))[0], corner, atol=ATOL_MM
    )
    # every output voxel centre sits (j + 0.5) mm from the corner along the input's axes
    index = np.array(list(itertools.product(*(range(m) for m in grid.shape))), dtype=float)
    expected = corner + (index + 0.5) @ direction.T
    np.testing.assert_allclose(_world(grid.affine, index), expected, atol=ATOL_MM)
    # the grid reorients exactly like its source
    source = Reorientation.from_affine(affine, shape)
    target = Reorientation.from_affine(grid.affine, grid.shape)
    assert (target.ras_axes, target.flipped_in_ras) == (source.ras_axes, source.flipped_in_ras)


@pytest.mark.parametrize('key', GEOMETRIES)
def test_far_corner_is_kept_when_the_field_of_view_is_whole_millimetres(make_affine, key):
    zooms, world_axes, signs, degrees, axis = GEOMETRIES[key]
    zooms = (2.0, 0.5, 3.0)  # with shape (5, 6, 4): 10, 3 and 12 mm
    affine = make_affine(zooms, world_axes, signs, degrees, axis, shift=(4.0, -8.0, 1.5))
    shape = (5, 6, 4)
    grid = native_grid(shape, affine)
    assert grid.shape == (10, 3, 12)
    far = _world(affine, np.array([[4.5, 5.5, 3.5]]))[0]
    np.testing.assert_allclose(
        _world(grid.affine, np.array([[9.5, 2.5, 11.5]]))[0], far, atol=ATOL_MM
    )


def test_native_shape_rounds_half_up():
    assert native_shape((5, 5, 5), (0.5, 0.7, 0.9)) == (3, 4, 5)  # 2.5, 3.5, 4.5 up
    assert native_shape((3, 3, 3), (1.0, 1.1, 0.1)) == (3, 3, 1)  # 3.3 down; 0.3 -> at least 1
    # a half that float32 storage turned into 3.4999999 still rounds up
    assert native_shape((5, 2, 2), (float(np.float32(0.7)), 1.0, 1.0)) == (4, 2, 2)
    assert native_shape((4, 4, 4), (3.0, 3.0, 3.0), spacing=2.0) == (6, 6, 6)
    with pytest.raises(ValueError, match='voxel size'):
        native_shape((4, 4, 4), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match='spacing'):
        native_shape((4, 4, 4), (1.0, 1.0, 1.0), spacing=-1)


def test_other_spacing_keeps_the_corner(make_affine):
    affine = _affine(make_affine, 'oblique-flipped')
    grid = native_grid((4, 9, 5), affine, spacing=0.5)
    np.testing.assert_allclose(grid.voxel_sizes, (0.5, 0.5, 0.5), atol=1e-12)
    np.testing.assert_allclose(grid.corner, _world(affine, np.full((1, 3), -0.5))[0], atol=ATOL_MM)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match='finite 4x4'):
        native_grid((4, 4, 4), np.full((4, 4), np.inf))
    with pytest.raises(ValueError, match='voxel size'):
        native_grid((4, 4, 4), np.diag([1.0, 0.0, 1.0, 1.0]))


# --- 1D operators ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ('n', 'r'), [(7, 3.0), (5, 2.7), (9, 1.0), (11, 0.5), (8, 0.73), (3, 4.9)]
)
def test_flipped_operator_mirrors_the_direct_one(n, r):
    m = native_shape((n, 1, 1), (r, 1.0, 1.0))[0]
    direct = axis_operator(n, r, m)
    flipped = axis_operator(n, r, m, flipped=True)
    assert direct.shape == (m, n)
    np.testing.assert_allclose(direct.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(flipped, direct[::-1, ::-1], atol=1e-12)


# --- resampling ------------------------------------------------------------------------


@pytest.mark.parametrize('key', GEOMETRIES)
def test_constant_stays_constant(make_affine, key):
    affine = _affine(make_affine, key)
    data = np.full(_shape(key), 42.5, dtype=np.float32)
    out, grid = resample_image_to_native_grid(data, affine)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == grid.shape
    np.testing.assert_allclose(out, 42.5, rtol=1e-6)


THICK_GEOMETRIES = {  # every axis >= 1 mm, so every axis is interpolated linearly
    'ras': ((1.0, 1.0, 3.0), (0, 1, 2), (1, 1, 1), 0.0, (0, 0, 1)),
    'lps': ((1.0, 1.2, 4.0), (0, 1, 2), (-1, -1, 1), 0.0, (0, 0, 1)),
    'pir': ((1.0, 1.0, 5.0), (1, 2, 0), (-1, -1, 1), 0.0, (0, 0, 1)),
    'oblique-flipped': ((1.3, 1.0, 2.5), (2, 0, 1), (-1, 1, -1), 30.0, (1, 2, 3)),
}


@pytest.mark.parametrize('key', THICK_GEOMETRIES)
def test_linear_ramp_is_reproduced_at_interior_voxels(make_affine, key):
    zooms, world_axes, signs, degrees, axis = THICK_GEOMETRIES[key]
    affine = make_affine(zooms, world_axes, signs, degrees, axis, (5.0, 6.0, 7.0))
    shape = (6, 7, 5)
    gradient, offset = np.array([0.7, -1.3, 2.1]), 5.0
    index = np.indices(shape).reshape(3, -1).T.astype(float)
    data = (_world(affine, index) @ gradient + offset).reshape(shape)

    out, grid = resample_image_to_native_grid(data, affine)
    assert out.dtype == np.float64
    out_index = np.indices(grid.shape).reshape(3, -1).T.astype(float)
    out_world = _world(grid.affine, out_index)
    in_position = _world(np.linalg.inv(affine), out_world)  # input voxel coordinates
    interior = np.all((in_position >= -1e-9) & (in_position <= np.array(shape) - 1 + 1e-9), axis=1)
    assert interior.sum() >= 0.3 * interior.size
    np.testing.assert_allclose(
        out.reshape(-1)[interior], out_world[interior] @ gradient + offset, atol=1e-9
    )


@pytest.mark.parametrize('key', GEOMETRIES)
def test_ras_path_equals_direct_path(make_affine, key):
    affine, shape = _affine(make_affine, key), _shape(key)
    data = np.random.default_rng(4).random(shape)
    through_ras, grid = resample_image_to_native_grid(data, affine)
    direct = resample_to_native_grid(torch.from_numpy(data), tuple(_sizes(affine)), grid.shape)
    np.testing.assert_allclose(through_ras, direct.numpy(), atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    world_axes=st.permutations(range(3)),
    signs=st.tuples(*[st.sampled_from((-1, 1))] * 3),
    zooms=st.tuples(*[st.floats(0.4, 5.0)] * 3),
    degrees=st.floats(-40.0, 40.0),
    shape=st.tuples(*[st.integers(2, 7)] * 3),
)
def test_ras_path_equals_direct_path_property(
    make_affine, world_axes, signs, zooms, degrees, shape
):
    affine = make_affine(zooms, world_axes, signs, degrees, (1.0, -2.0, 0.5), (3.0, 2.0, 1.0))
    data = np.random.default_rng(5).random(shape)
    through_ras, grid = resample_image_to_native_grid(data, affine)
    direct = resample_to_native_grid(torch.from_numpy(data), tuple(_sizes(affine)), grid.shape)
    np.testing.assert_allclose(through_ras, direct.numpy(), atol=1e-12, rtol=0)


def test_sub_millimetre_axes_are_averaged():
    data = np.zeros((8, 6, 4), dtype=np.float32)
    data[1::2] = 2.0  # 0.5 mm stripes along axis 0
    out, grid = resample_image_to_native_grid(data, np.diag([0.5, 1.0, 1.0, 1.0]))
    assert grid.shape == (4, 6, 4)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)

    # flipped: the same stripes are averaged in the same pairs
    out_flipped, _ = resample_image_to_native_grid(data, np.diag([-0.5, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(out_flipped, 1.0, atol=1e-6)


def test_sub_millimetre_box_weights_are_areas():
    # 0.75 mm voxels, 1 mm output: voxel 0 covers [0, 0.75) and a third of voxel 1
    values = torch.tensor([3.0, 6.0, 9.0, 12.0], dtype=torch.float64).reshape(4, 1, 1)
    out = resample_to_native_grid(values, (0.75, 1.0, 1.0), (3, 1, 1)).reshape(-1)
    np.testing.assert_allclose(out.numpy(), [3.75, 7.5, 11.25], atol=1e-12)


def test_one_millimetre_input_is_unchanged():
    data = torch.rand(
        2, 1, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    for flipped in [(False, False, False), (True, False, True)]:
        out = resample_to_native_grid(data, (1.0, 1.0, 1.0), (5, 6, 7), flipped=flipped)
        torch.testing.assert_close(out, data, atol=1e-12, rtol=0)


def test_thick_axis_is_interpolated_linearly():
    data = torch.tensor([0.0, 3.0, 6.0], dtype=torch.float64).reshape(1, 1, 3)
    out = resample_to_native_grid(data, (1.0, 1.0, 3.0), (1, 1, 9)).reshape(-1)
    # centres of the 3 mm voxels at 1.5, 4.5, 7.5 mm; 1 mm centres at 0.5 .. 8.5 mm
    expected = np.clip(np.arange(0.5, 9.0) - 1.5, 0.0, 6.0)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


def test_tensor_input_keeps_type_dtype_and_leading_axes(make_affine):
    affine = _affine(make_affine, 'pir')
    data = torch.rand(2, 1, *_shape('pir'), generator=torch.Generator().manual_seed(2))
    out, grid = resample_image_to_native_grid(data, affine)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (2, 1, *grid.shape)
    single, _ = resample_image_to_native_grid(data[1, 0].numpy(), affine)
    np.testing.assert_allclose(out[1, 0].numpy(), single, atol=1e-6)


def test_integer_input_is_resampled_as_float32():
    data = np.full((4, 4, 2), 7, dtype=np.int16)
    out, grid = resample_image_to_native_grid(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert out.dtype == np.float32 and grid.shape == (4, 4, 4)
    np.testing.assert_allclose(out, 7.0)


def test_resample_rejects_mismatched_arguments():
    volume = torch.zeros(4, 4, 4)
    with pytest.raises(ValueError, match='3 voxel sizes'):
        resample_to_native_grid(volume, (1.0, 1.0), (4, 4, 4))
    with pytest.raises(ValueError, match='at least 3 dimensions'):
        resample_to_native_grid(torch.zeros(4, 4), (1.0, 1.0, 1.0), (4, 4, 4))
