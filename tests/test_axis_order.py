"""The thickest-last axis order shared by training pairs and inference."""

from __future__ import annotations

import itertools
import json

import pytest

from cahal_bids.core.axis_order import inverse, thickest_last, validated_axis_order


@pytest.mark.parametrize(
    ('sizes', 'order'),
    [
        ((1.0, 1.0, 4.0), (0, 1, 2)),
        ((4.0, 1.0, 1.0), (1, 2, 0)),
        ((1.0, 4.0, 1.0), (0, 2, 1)),
        ((2.0, 2.0, 1.5), (0, 2, 1)),  # equally thick: the last of them
        ((3.0, 3.0, 3.0), (0, 1, 2)),
        ((3.0, 1.0, 2.9999999), (0, 1, 2)),  # header float noise counts as equal
    ],
)
def test_thickest_axis_goes_last_and_the_others_keep_their_order(sizes, order):
    assert thickest_last(sizes) == order


def test_inverse_undoes_every_permutation():
    for permutation in itertools.permutations(range(3)):
        undo = inverse(permutation)
        assert tuple(permutation[axis] for axis in undo) == (0, 1, 2)


def test_manifest_entry_is_checked():
    assert validated_axis_order(None, where='m') == 'as-acquired'
    assert validated_axis_order('thickest-last', where='m') == 'thickest-last'
    with pytest.raises(ValueError, match='m: "axis_order" must be one of'):
        validated_axis_order('slices-first', where='m')
    with pytest.raises(ValueError, match='three voxel sizes'):
        thickest_last((1.0, 2.0))


def test_zoo_manifest_axis_order_is_written_and_checked(make_zoo):
    from cahal_bids.engine.zoo import MANIFEST_NAME, Zoo, ZooError

    folder = make_zoo('ordered', cells=['V1A3'], axis_order='thickest-last')
    assert Zoo.open(folder).axis_order == 'thickest-last'
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest['axis_order'] = 'slices-first'
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match='axis_order') as caught:
        Zoo.open(folder)
    assert str(manifest_path) in str(caught.value)
