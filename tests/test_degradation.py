"""Tests of the physics-based degradation model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cahal_bids.core.routing import CELLS, route
from cahal_bids.physics.acquisition import CellSampler, ClinicalMixSampler
from cahal_bids.physics.degradation import (
    DegradationParameters,
    Degrade,
    RandomDegrade,
    degrade,
    low_resolution_shape,
)

resolutions = st.floats(min_value=1.0, max_value=6.0)
fractions = st.floats(min_value=0.0, max_value=0.999)
sizes = st.integers(min_value=6, max_value=20)


def _offsets(resolution: tuple[float, ...], fraction: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-r * f for r, f in zip(resolution, fraction, strict=True))


def _covered_lengths(n: int, resolution: float, offset: float, m: int) -> np.ndarray:
    """Length each low-resolution voxel shares with the 1 mm field of view [0, n)."""
    low = offset + np.arange(m) * resolution
    return np.clip(np.minimum(low + resolution, n) - np.maximum(low, 0.0), 0.0, None)


def _smooth(shape: tuple[int, int, int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    grids = torch.meshgrid(*(torch.arange(n, dtype=dtype) for n in shape), indexing='ij')
    x, y, z = (g / n for g, n in zip(grids, shape, strict=True))
    return 1.0 + torch.sin(2.0 * x) * torch.cos(1.5 * y) + 0.5 * z


# --- agreement with torch's own operators ----------------------------------------------------


@pytest.mark.parametrize('factors', [(2, 2, 2), (1, 1, 4), (3, 1, 2), (4, 3, 1)])
def test_integer_factors_match_area_and_trilinear(factors: tuple[int, int, int]) -> None:
    shape = (24, 24, 24)
    x = torch.rand(2, 1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    degraded, low = degrade(x, [float(f) for f in factors], return_low_resolution=True)
    low_shape = tuple(n // f for n, f in zip(shape, factors, strict=True))
    area = F.interpolate(x, size=low_shape, mode='area')
    torch.testing.assert_close(low, area, rtol=1e-12, atol=1e-12)
    back = F.interpolate(low, size=shape, mode='trilinear', align_corners=False)
    torch.testing.assert_close(degraded, back, rtol=1e-12, atol=1e-12)


def test_identity_axes_untouched() -> None:
    x = torch.rand(10, 11, 12, dtype=torch.float64)
    degraded, low = degrade(x, (1.0, 1.0, 1.0), return_low_resolution=True)
    assert torch.equal(degraded, x)
    assert torch.equal(low, x)
    assert degraded.data_ptr() != x.data_ptr() and low.data_ptr() != x.data_ptr()
    # a 1 mm axis with a non-zero offset is resampled (one more voxel, shifted grid)
    _, low = degrade(x, (1.0, 1.0, 1.0), (0.0, 0.0, -0.5), return_low_resolution=True)
    assert low.shape == (10, 11, 13)


@pytest.mark.parametrize(
    ('resolution', 'offset'),
    [((2.7, 3.3, 1.0), (0.0, 0.0, 0.0)), ((1.0, 2.7, 3.3), (0.0, -1.2, -3.2)), ((1.5,) * 3, None)],
)
def test_non_integer_factors(resolution: tuple[float, ...], offset: tuple | None) -> None:
    shape = (16, 20, 18)
    offset = offset or (0.0, 0.0, 0.0)
    x = _smooth(shape)
    degraded, low = degrade(x, resolution, offset, return_low_resolution=True)
    expected = tuple(
        math.ceil((n - o) / r) for n, r, o in zip(shape, resolution, offset, strict=True)
    )
    assert low.shape == expected == low_resolution_shape(shape, resolution, offset)
    assert degraded.shape == shape
    assert torch.isfinite(degraded).all()
    # the degraded image is blurred, not rebuilt from scratch
    assert (degraded - x).abs().max() < 0.5


def test_low_resolution_size_is_robust_to_rounding() -> None:
    # 27 / 2.7 is 10.000000000000002 in floating point: still 10 voxels, no empty one
    assert low_resolution_shape((27, 33, 10), (2.7, 3.3, 1.0)) == (10, 10, 10)
    # a sliver of 1e-9 mm left of the field of view still needs a voxel to cover the end
    assert low_resolution_shape((6, 6, 6), (1.0, 1.0, 1.0), (0.0, 0.0, -1e-9)) == (6, 6, 7)
    assert low_resolution_shape((6, 6, 6), (3.0, 3.0, 3.0), (0.0, -1.0, -2.999)) == (2, 3, 3)
    with pytest.raises(ValueError, match='shape'):
        low_resolution_shape((6, 6), (1.0, 1.0, 1.0))


def test_exact_low_resolution_values() -> None:
    # 1D profile along z: 0, 1, ..., 5 at 2.5 mm from -1 mm: voxels [-1, 1.5), [1.5, 4), [4, 6.5)
    x = torch.arange(6.0, dtype=torch.float64).reshape(1, 1, 6)
    _, low = degrade(x, (1.0, 1.0, 2.5), (0.0, 0.0, -1.0), return_low_resolution=True)
    expected = [(0 + 0.5 * 1) / 1.5, (0.5 * 1 + 2 + 3) / 2.5, (4 + 5) / 2.0]
    torch.testing.assert_close(low.flatten(), torch.tensor(expected, dtype=torch.float64))


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(sizes, sizes, sizes),
    resolution=st.tuples(resolutions, resolutions, resolutions),
    fraction=st.tuples(fractions, fractions, fractions),
    value=st.floats(min_value=-100.0, max_value=100.0),
)
def test_constant_is_preserved(shape, resolution, fraction, value) -> None:
    x = torch.full(shape, value, dtype=torch.float64)
    degraded, low = degrade(
        x, resolution, _offsets(resolution, fraction), return_low_resolution=True
    )
    torch.testing.assert_close(degraded, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low, torch.full_like(low, value), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(sizes, sizes, sizes),
    resolution=st.tuples(resolutions, resolutions, resolutions),
    fraction=st.tuples(fractions, fractions, fractions),
    seed=st.integers(0, 2**31 - 1),
)
def test_covered_length_weighted_mean_is_exact(shape, resolution, fraction, seed) -> None:
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    offset = _offsets(resolution, fraction)
    _, low = degrade(x, resolution, offset, return_low_resolution=True)
    lengths = [
        torch.from_numpy(_covered_lengths(n, r, o, m))
        for n, r, o, m in zip(shape, resolution, offset, low.shape, strict=True)
    ]
    weights = lengths[0][:, None, None] * lengths[1][None, :, None] * lengths[2][None, None, :]
    assert float(weights.sum()) == pytest.approx(math.prod(shape), rel=1e-12)
    assert float((weights * low).sum()) == pytest.approx(float(x.sum()), rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    resolution=st.tuples(resolutions, resolutions, resolutions),
    fraction=st.tuples(fractions, fractions, fractions),
)
def test_round_trip_keeps_mean_of_smooth_image(resolution, fraction) -> None:
    x = _smooth((32, 36, 30))
    degraded = degrade(x, resolution, _offsets(resolution, fraction))
    assert float(degraded.mean()) == pytest.approx(float(x.mean()), rel=0.02)


def test_batched_equals_one_by_one() -> None:
    x = torch.rand(3, 2, 14, 15, 16, dtype=torch.float64)
    resolution, offset = (2.7, 1.0, 3.3), (-0.4, 0.0, -2.0)
    batched, low = degrade(x, resolution, offset, return_low_resolution=True)
    for b in range(3):
        for c in range(2):
            single, single_low = degrade(x[b, c], resolution, offset, return_low_resolution=True)
            torch.testing.assert_close(batched[b, c], single, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(low[b, c], single_low, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    x64 = _smooth((12, 16, 20))
    resolution, offset = (1.0, 2.7, 4.0), (0.0, -1.0, -3.0)
    out = degrade(x64.to(dtype), resolution, offset)
    assert out.dtype == dtype
    reference = degrade(x64, resolution, offset)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


def test_degradation_loses_detail() -> None:
    x = _smooth((24, 24, 24))
    x[..., ::2] += 1.0  # stripes along z, 1 mm period
    degraded = degrade(x, (1.0, 1.0, 4.0))
    assert (degraded - x).abs().mean() > 0.3
    assert torch.equal(degrade(x, (1.0, 1.0, 1.0)), x)


@pytest.mark.parametrize(
    ('volume', 'resolution', 'offset', 'match'),
    [
        (torch.zeros(4, 4), (1, 1, 1), (0, 0, 0), 'at least 3 axes'),
        (torch.zeros(4, 4, 4, dtype=torch.int64), (1, 1, 1), (0, 0, 0), 'int64'),
        (np.zeros((4, 4, 4)), (1, 1, 1), (0, 0, 0), 'ndarray'),
        (torch.zeros(4, 4, 4), (1, 1), (0, 0, 0), r'\(1, 1\)'),
        (torch.zeros(4, 4, 4), (1, 0.5, 1), (0, 0, 0), '0.5'),
        (torch.zeros(4, 4, 4), (1, math.inf, 1), (0, 0, 0), 'inf'),
        (torch.zeros(4, 4, 4), (1, 2, 1), (0, -2, 0), '-2.0'),
        (torch.zeros(4, 4, 4), (1, 2, 1), (0, 0.5, 0), '0.5'),
        (torch.zeros(4, 4, 4), (1, 2, 1), (0, 0), 'offset'),
    ],
)
def test_degrade_rejects(volume, resolution, offset, match) -> None:
    with pytest.raises(ValueError, match=match):
        degrade(volume, resolution, offset)


# --- parameters, deterministic and random classes ------------------------------------------


def test_parameters_round_trip_through_json() -> None:
    params = DegradationParameters((1.0, 1.2, 4.5), (0.0, -0.3, -1.25), 'V5A1', 7)
    restored = DegradationParameters.from_dict(json.loads(json.dumps(params.as_dict())))
    assert restored == params
    assert DegradationParameters.from_dict({'resolution': [2, 2, 2]}).offset == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ('kwargs', 'match'),
    [
        ({'resolution': (1.0, 2.0)}, 'resolution'),
        ({'resolution': (1.0, 0.8, 2.0)}, '0.8'),
        ({'resolution': (2.0, 2.0, 2.0), 'offset': (0.0, 0.0, -2.0)}, '-2.0'),
        ({'resolution': (2.0, 2.0, 2.0), 'seed': 1.5}, '1.5'),
        ({'resolution': (2.0, 2.0, 2.0), 'cell': 5}, 'cell'),
    ],
)
def test_parameters_reject(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DegradationParameters(**kwargs)


def test_parameters_from_dict_rejects() -> None:
    with pytest.raises(ValueError, match='colour'):
        DegradationParameters.from_dict({'resolution': [2, 2, 2], 'colour': 'red'})
    with pytest.raises(ValueError, match='resolution'):
        DegradationParameters.from_dict({'offset': [0, 0, 0]})


@settings(max_examples=30, deadline=None)
@given(cell=st.sampled_from(CELLS), seed=st.integers(0, 2**32 - 1))
def test_replay_reproduces_random_degrade(cell: str, seed: int) -> None:
    x = _smooth((16, 14, 12), dtype=torch.float32)
    transform = RandomDegrade(CellSampler(cell))
    degraded, params = transform(x, np.random.default_rng(seed))
    assert params.cell == cell == route(params.resolution).cell
    assert all(-r < o <= 0.0 for r, o in zip(params.resolution, params.offset, strict=True))
    assert torch.equal(Degrade(params)(x), degraded)
    assert torch.equal(Degrade(DegradationParameters.from_dict(params.as_dict()))(x), degraded)
    assert transform.sample_parameters(params.seed) == params
    again, same = transform(x, np.random.default_rng(seed))
    assert same == params and torch.equal(again, degraded)


def test_random_degrade_offsets() -> None:
    x = torch.zeros(8, 8, 8)
    fixed = RandomDegrade(lambda rng: (1.0, 2.0, 3.0), random_offset=False)
    assert fixed(x, 0)[1].offset == (0.0, 0.0, 0.0)
    moving = RandomDegrade(lambda rng: (1.0, 2.0, 3.0))
    offsets = np.array([moving(x, seed)[1].offset for seed in range(200)])
    assert (offsets[:, 0] == 0.0).all()  # 1 mm axes keep the grid
    assert offsets[:, 1].min() > -2.0 and offsets[:, 1].max() <= 0.0
    assert offsets[:, 2].min() > -3.0 and offsets[:, 2].min() < -2.5
    assert len({tuple(o) for o in offsets}) == 200


def test_random_degrade_with_clinical_mix_and_batch() -> None:
    x = torch.rand(2, 1, 12, 12, 12)
    degraded, params = RandomDegrade(ClinicalMixSampler('research'))(x, 3)
    assert degraded.shape == x.shape
    assert min(params.resolution) >= 1.0


def test_classes_reject() -> None:
    with pytest.raises(ValueError, match='dict'):
        Degrade({'resolution': (2, 2, 2)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='callable'):
        RandomDegrade((2.0, 2.0, 2.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='-1'):
        RandomDegrade(CellSampler('V5A1')).sample_parameters(-1)
    with pytest.raises(ValueError, match='sampled resolution'):
        RandomDegrade(lambda rng: (2.0, 2.0))(torch.zeros(4, 4, 4), 0)


# --- device --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu() -> None:
    x = _smooth((20, 24, 18), dtype=torch.float32)
    resolution, offset = (1.1, 2.7, 4.3), (-0.5, -1.0, -4.0)
    on_gpu = degrade(x.cuda(), resolution, offset)
    assert on_gpu.device.type == 'cuda'
    torch.testing.assert_close(on_gpu.cpu(), degrade(x, resolution, offset), rtol=1e-5, atol=1e-5)
