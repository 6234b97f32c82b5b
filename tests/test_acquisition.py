"""Tests of the acquisition generator G(V, A) and its samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cahal_bids.core.routing import CELLS, cell_bounds, route
from cahal_bids.physics.acquisition import (
    CLINICAL_PATTERN_MIX,
    PATTERN_ODD_AXIS,
    RESEARCH_PATTERN_MIX,
    CellSampler,
    ClinicalMixSampler,
    sample_clinical_mix,
    sample_in_cell,
    triplet_from_volume_anisotropy,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def _equal_pair(sizes: tuple[float, float, float], odd_axis: int) -> bool:
    others = [s for i, s in enumerate(sizes) if i != odd_axis]
    return others[0] == others[1] and sizes[odd_axis] >= others[0]


# --- G(V, A) -------------------------------------------------------------------------------


@given(
    volume=st.floats(min_value=1.0, max_value=50.0),
    anisotropy=st.floats(min_value=0.02, max_value=1.0),
    odd_axis=st.sampled_from([0, 1, 2]),
)
def test_generator_inverts(volume: float, anisotropy: float, odd_axis: int) -> None:
    if volume * anisotropy < 1.0:
        with pytest.raises(ValueError, match='infeasible'):
            triplet_from_volume_anisotropy(volume, anisotropy, odd_axis)
        return
    sizes = triplet_from_volume_anisotropy(volume, anisotropy, odd_axis)
    assert math.prod(sizes) == pytest.approx(volume, rel=1e-12)
    assert min(sizes) / max(sizes) == pytest.approx(anisotropy, rel=1e-12)
    assert min(sizes) >= 1.0
    assert _equal_pair(sizes, odd_axis)
    assert max(sizes) == sizes[odd_axis]


def test_generator_examples() -> None:
    assert triplet_from_volume_anisotropy(5.0, 0.2) == (1.0, 1.0, 5.0)
    assert triplet_from_volume_anisotropy(5.0, 0.2, odd_axis=1) == (1.0, 5.0, 1.0)
    assert triplet_from_volume_anisotropy(1.0, 1.0) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ('volume', 'anisotropy', 'odd_axis', 'match'),
    [
        (0.9, 1.0, 2, '0.9'),
        (math.nan, 1.0, 2, 'nan'),
        (2.0, 0.0, 2, '0.0'),
        (2.0, 1.2, 2, '1.2'),
        (2.0, 0.4, 2, 'infeasible'),
        (2.0, 1.0, 3, 'odd_axis'),
    ],
)
def test_generator_rejects(volume: float, anisotropy: float, odd_axis: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        triplet_from_volume_anisotropy(volume, anisotropy, odd_axis)


# --- sampling in a cell --------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(cell=st.sampled_from(CELLS), seed=seeds, odd_axis=st.sampled_from([None, 0, 1, 2]))
def test_sample_lands_in_cell(cell: str, seed: int, odd_axis: int | None) -> None:
    sizes = sample_in_cell(cell, np.random.default_rng(seed), odd_axis=odd_axis)
    assert route(sizes).cell == cell
    assert min(sizes) >= 1.0
    axis = int(np.argmax(sizes)) if odd_axis is None else odd_axis
    assert _equal_pair(sizes, axis)
    assert math.prod(sizes) < 10.5


@pytest.mark.parametrize('cell', CELLS)
def test_every_cell_many_draws(cell: str) -> None:
    rng = np.random.default_rng(1234)
    (v_low, v_high), (a_low, a_high) = cell_bounds(cell)
    for _ in range(40):
        sizes = sample_in_cell(cell, rng)
        routed = route(sizes)
        assert routed.cell == cell
        assert v_low <= routed.volume < min(v_high, 10.5)
        assert a_low < routed.anisotropy <= a_high


def test_sample_covers_feasible_part_uniformly() -> None:
    # V3A1 is mostly infeasible: only V * A >= 1 survives, so V must exceed 1 / 0.33.
    rng = np.random.default_rng(0)
    volumes = [math.prod(sample_in_cell('V3A1', rng)) for _ in range(300)]
    assert min(volumes) >= 1 / 0.33 - 1e-9
    assert max(volumes) > 3.4
    # V7 is capped at the evaluation's 10.5 mm^3, and the cap can be raised.
    wide = [math.prod(sample_in_cell('V7A3', rng, max_volume=20.0)) for _ in range(200)]
    assert max(wide) > 10.5


def test_random_orientation_permutation() -> None:
    rng = np.random.default_rng(5)
    axes = {int(np.argmax(sample_in_cell('V5A1', rng))) for _ in range(60)}
    assert axes == {0, 1, 2}


@given(cell=st.sampled_from(CELLS), seed=seeds)
def test_same_seed_same_triplet(cell: str, seed: int) -> None:
    first = sample_in_cell(cell, np.random.default_rng(seed))
    assert sample_in_cell(cell, np.random.default_rng(seed)) == first
    assert CellSampler(cell)(np.random.default_rng(seed)) == first


def test_sample_in_cell_rejects() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='V1A1'):
        sample_in_cell('V1A1', rng)
    with pytest.raises(ValueError, match='6.0'):
        sample_in_cell('V7A1', rng, max_volume=6.0)
    with pytest.raises(ValueError, match='odd_axis'):
        sample_in_cell('V5A1', rng, odd_axis=5)
    with pytest.raises(ValueError, match='V9A9'):
        CellSampler('V9A9')


# --- clinical mix --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('database', 'mix'), [('research', RESEARCH_PATTERN_MIX), ('clinical', CLINICAL_PATTERN_MIX)]
)
def test_clinical_mix_proportions(database: str, mix: dict[str, float]) -> None:
    rng = np.random.default_rng(2024)
    draws = 4000
    counts = dict.fromkeys(mix, 0)
    for _ in range(draws):
        sizes, pattern = sample_clinical_mix(rng, database=database)
        counts[pattern] += 1
        assert min(sizes) >= 1.0
        assert math.prod(sizes) < 10.5
        if pattern == 'isotropic':
            assert sizes[0] == sizes[1] == sizes[2]
        else:
            assert _equal_pair(sizes, PATTERN_ODD_AXIS[pattern])
            assert route(sizes).cell in CELLS
    total = sum(mix.values())
    for pattern, share in mix.items():
        assert counts[pattern] / draws == pytest.approx(share / total, abs=0.025)


def test_clinical_mix_anisotropic_cells_spread() -> None:
    rng = np.random.default_rng(9)
    cells = set()
    for _ in range(600):
        sizes, pattern = sample_clinical_mix(rng, database='clinical')
        if pattern == 'axial':
            cells.add(route(sizes).cell)
    assert cells == set(CELLS)


@given(seed=seeds, database=st.sampled_from(['research', 'clinical']))
def test_clinical_mix_same_seed(seed: int, database: str) -> None:
    first = sample_clinical_mix(np.random.default_rng(seed), database=database)
    assert sample_clinical_mix(np.random.default_rng(seed), database=database) == first
    assert ClinicalMixSampler(database)(np.random.default_rng(seed)) == first[0]


def test_clinical_mix_rejects() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='hospital'):
        sample_clinical_mix(rng, database='hospital')
    with pytest.raises(ValueError, match='inf'):
        sample_clinical_mix(rng, max_volume=math.inf)
    with pytest.raises(ValueError, match='hospital'):
        ClinicalMixSampler('hospital')


class _EdgeFirstGenerator:
    """A Generator whose first rejection round sits exactly on the cell's edges."""

    def __init__(self, seed: int, edge: str) -> None:
        self._rng = np.random.default_rng(seed)
        self._calls = 0
        self._edge = edge

    def integers(self, *args: object, **kwargs: object) -> np.ndarray:
        return self._rng.integers(*args, **kwargs)  # type: ignore[call-overload]

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        self._calls += 1
        if self._calls > 2:
            return self._rng.uniform(low, high, size)
        if self._edge == 'top':  # V just below its open top, A exactly at its closed top
            value = np.nextafter(high, low) if self._calls == 1 else 0.0
        else:  # V exactly at its closed bottom, A just above its open bottom
            value = low if self._calls == 1 else np.nextafter(high, low)
        return np.full(size, value)


@pytest.mark.parametrize('edge', ['top', 'bottom'])
@pytest.mark.parametrize('cell', CELLS)
def test_bin_edges_never_leak(cell: str, edge: str) -> None:
    for axis in (0, 1, 2):
        rng = _EdgeFirstGenerator(axis, edge)
        sizes = sample_in_cell(cell, rng, odd_axis=axis)  # type: ignore[arg-type]
        assert route(sizes).cell == cell
        assert min(sizes) >= 1.0
