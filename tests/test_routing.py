"""The deterministic gate: bins, boundaries, feasibility, skipping."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cahal_bids.core.errors import RoutingError
from cahal_bids.core.routing import (
    CELLS,
    INFEASIBLE_CELLS,
    SKIP_TOLERANCE_MM,
    anisotropy_bin,
    cell_bounds,
    route,
    volume_bin,
)


def test_eighteen_feasible_cells():
    assert len(CELLS) == 18
    assert len(set(CELLS)) == 18
    assert not INFEASIBLE_CELLS & set(CELLS)
    assert CELLS[0] == 'V1A3'
    assert CELLS[-1] == 'V7A1'


@pytest.mark.parametrize(
    ('sizes', 'cell'),
    [
        ((1.0, 1.0, 5.0), 'V5A1'),  # thick-slice axial: same V as 1.7 iso, other regime
        ((1.7, 1.7, 1.7), 'V5A3'),
        ((1.0, 1.0, 3.0), 'V3A2'),  # A = 0.333 > 0.33
        ((0.5, 0.5, 5.0), 'V5A1'),  # sub-millimetre in-plane routes like 1 x 1 x 5
        ((5.0, 1.0, 1.0), 'V5A1'),  # orientation does not matter
        ((1.0, 4.0, 1.0), 'V4A1'),
        ((1.1, 1.1, 1.1), 'V1A3'),
        ((1.2, 1.2, 1.2), 'V2A3'),
        ((1.0, 1.0, 1.2), 'V1A3'),
        ((1.0, 1.0, 2.0), 'V2A2'),
        ((2.0, 2.0, 2.0), 'V7A3'),
        ((0.45, 0.45, 6.0), 'V6A1'),
    ],
)
def test_paper_and_clinical_examples(sizes, cell):
    decision = route(sizes)
    assert decision.cell == cell
    assert not decision.skip


@pytest.mark.parametrize('sizes', [(0.9, 0.9, 0.9), (1.0, 1.0, 1.0), (0.5, 0.5, 1.0005)])
def test_already_one_millimetre_is_skipped(sizes):
    decision = route(sizes)
    assert decision.skip
    assert decision.cell is None


def test_skip_tolerance_boundary():
    assert route((1.0, 1.0, 1.0 + SKIP_TOLERANCE_MM)).skip
    assert not route((1.0, 1.0, 1.0 + 2 * SKIP_TOLERANCE_MM)).skip


@pytest.mark.parametrize(
    ('volume', 'index'),
    [
        (1.0, 1),
        (1.4999999, 1),
        (1.5, 2),
        (2.4999999, 2),
        (2.5, 3),
        (3.5, 4),
        (4.5, 5),
        (5.5, 6),
        (6.4999999, 6),
        (6.5, 7),
        (1e6, 7),
    ],
)
def test_volume_bin_boundaries(volume, index):
    assert volume_bin(volume) == index


@pytest.mark.parametrize(
    ('anisotropy', 'index'),
    [
        (1e-9, 1),
        (0.33, 1),
        (0.3300001, 2),
        (0.66, 2),
        (0.6600001, 3),
        (1.0, 3),
    ],
)
def test_anisotropy_bin_boundaries(anisotropy, index):
    assert anisotropy_bin(anisotropy) == index


@pytest.mark.parametrize('volume', [0.999, -1.0, math.nan, math.inf * -1])
def test_volume_outside_grid(volume):
    with pytest.raises(RoutingError):
        volume_bin(volume)


@pytest.mark.parametrize('anisotropy', [0.0, -0.1, 1.0000001, math.nan])
def test_anisotropy_outside_grid(anisotropy):
    with pytest.raises(RoutingError):
        anisotropy_bin(anisotropy)


@pytest.mark.parametrize(
    'sizes', [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (math.nan, 1, 1), (math.inf, 1, 1)]
)
def test_bad_voxel_sizes(sizes):
    with pytest.raises(RoutingError):
        route(sizes)


def test_cell_bounds():
    assert cell_bounds('V5A1') == ((4.5, 5.5), (0.0, 0.33))
    with pytest.raises(ValueError, match='V1A1'):
        cell_bounds('V1A1')


size = st.floats(min_value=0.05, max_value=12.0, allow_nan=False, allow_infinity=False)


@given(st.tuples(size, size, size))
def test_clipped_sizes_never_land_in_an_infeasible_cell(sizes):
    """Fully heterogeneous triplets included: clipping to 1 mm makes V1A1, V1A2, V2A1 empty."""
    decision = route(sizes)
    if decision.skip:
        assert max(sizes) <= 1.0 + SKIP_TOLERANCE_MM
        return
    assert decision.cell in CELLS
    assert min(decision.routed_sizes) >= 1.0
    assert decision.volume >= 1.0
    (v_low, v_high), (a_low, a_high) = cell_bounds(decision.cell)
    assert v_low <= decision.volume < v_high
    assert a_low < decision.anisotropy <= a_high


@given(st.tuples(size, size, size), st.permutations([0, 1, 2]))
def test_routing_ignores_axis_order(sizes, order):
    permuted = tuple(sizes[i] for i in order)
    assert route(permuted).cell == route(sizes).cell
