"""Instance-norm statistics measured as in training (mean over head-centred patches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cahal_bids.engine.networks import ResidualUNet3D
from cahal_bids.engine.patch_statistics import (
    PATCH_MEAN_DEFAULTS,
    patch_centres,
    patch_mean_statistics,
    validated_norm_statistics,
)
from cahal_bids.engine.zoo import MANIFEST_NAME, Zoo, ZooError

pytestmark = pytest.mark.usefixtures('one_thread')


def _network(seed: int = 0) -> ResidualUNet3D:
    torch.manual_seed(seed)
    network = ResidualUNet3D(levels=2, initial_filters=4, zero_init_head=False)
    return network.eval()


def _head_in_air(shape=(48, 40, 32), seed=0) -> torch.Tensor:
    """A bright textured ellipsoid filling part of a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
    inside = sum((g / 0.5) ** 2 for g in grid) < 1
    data = np.where(inside, 0.6 + 0.4 * rng.random(shape), 0.0).astype(np.float32)
    return torch.from_numpy(data)[None, None]


def _assert_frozen_equals_plain(network, statistics, x) -> None:
    """``statistics`` are exactly the instance-norm statistics ``network`` computes on ``x``."""
    with torch.no_grad():
        plain = network(x)
        with network.frozen_norm_statistics(statistics):
            frozen = network(x)
    torch.testing.assert_close(frozen, plain, atol=1e-5, rtol=1e-5)


def test_missing_entry_means_whole_volume_and_defaults_fill_in() -> None:
    assert validated_norm_statistics(None, where='m') == {'method': 'whole-volume'}
    assert validated_norm_statistics({'method': 'patch-mean'}, where='m') == PATCH_MEAN_DEFAULTS
    custom = {'method': 'patch-mean', 'patch_size': 32, 'patches': 4, 'seed': 7}
    assert validated_norm_statistics(custom, where='m') == custom


@pytest.mark.parametrize(
    ('entry', 'message'),
    [
        ({'method': 'median'}, 'must name a method'),
        ('patch-mean', 'must name a method'),
        ({'method': 'patch-mean', 'patch_size': 4}, 'patch_size'),
        ({'method': 'patch-mean', 'patches': 0}, 'patches'),
        ({'method': 'patch-mean', 'seed': True}, 'seed'),
    ],
)
def test_bad_entries_are_refused_naming_where(entry: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        validated_norm_statistics(entry, where='zoo/manifest.json')
    assert 'zoo/manifest.json' in str(caught.value)


def test_centres_are_seeded_distinct_and_in_the_foreground() -> None:
    foreground = np.zeros((40, 40, 40), dtype=bool)
    foreground[10:30, 5:20, 12:36] = True
    first = patch_centres(foreground, count=6, seed=3)
    assert first == patch_centres(foreground, count=6, seed=3)
    assert first != patch_centres(foreground, count=6, seed=4)
    assert len(set(first)) == 6
    assert all(foreground[c] for c in first)
    # fewer candidates than asked: all of them, once
    tiny = np.zeros((40, 40, 40), dtype=bool)
    tiny[2, 2, 2] = tiny[6, 10, 14] = True
    assert patch_centres(tiny, count=5, seed=0) == [(2, 2, 2), (6, 10, 14)]
    # no foreground at all: the centre of the volume
    assert patch_centres(np.zeros((9, 8, 7), dtype=bool), count=3, seed=0) == [(4, 4, 3)]


def test_one_patch_reproduces_instance_norm_on_that_patch() -> None:
    network = _network()
    volume = _head_in_air()
    statistics = patch_mean_statistics(
        network, volume, foreground_level=0.3, patch_size=16, patches=1, seed=0
    )
    (centre,) = patch_centres((volume[0, 0] > 0.3).numpy(), count=1, seed=0)
    window = tuple(slice(c - 8, c + 8) for c in centre)
    patch = volume[(slice(None), slice(None), *window)]
    _assert_frozen_equals_plain(network, statistics, patch)


def test_small_volume_gets_its_own_whole_statistics() -> None:
    network = _network(1)
    volume = _head_in_air(shape=(16, 16, 8))
    statistics = patch_mean_statistics(network, volume, foreground_level=0.3, patch_size=64)
    _assert_frozen_equals_plain(network, statistics, volume)


def test_head_patches_ignore_the_background_that_whole_volume_statistics_see() -> None:
    """First-layer means: patch-mean follows the head, the whole volume is diluted by air."""
    network = _network(2)
    small_head = _head_in_air(shape=(64, 64, 64))
    statistics = patch_mean_statistics(
        network, small_head, foreground_level=0.3, patch_size=16, patches=8
    )
    first_layer_means: list[torch.Tensor] = []
    hook = network.norm_layers()[0].register_forward_pre_hook(
        lambda _m, inputs: first_layer_means.append(inputs[0].mean((0, 2, 3, 4)))
    )
    with torch.no_grad():
        network(small_head)
        window = (slice(None), slice(None), *(slice(24, 40),) * 3)  # inside the head
        network(small_head[window])
    hook.remove()
    whole, inside = first_layer_means
    patch_mean = statistics.layers[0][0]
    assert (patch_mean - inside).abs().max() < (whole - inside).abs().max()


def test_zoo_open_refuses_a_bad_entry(tmp_path, make_zoo) -> None:
    folder = make_zoo('bad', cells=['V1A3'])
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert Zoo.open(folder).norm_statistics == {'method': 'whole-volume'}
    manifest['norm_statistics'] = {'method': 'patch-mean', 'patches': -1}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match='norm_statistics.patches') as caught:
        Zoo.open(folder)
    assert str(manifest_path) in str(caught.value)


def test_written_zoo_records_its_statistics(make_zoo) -> None:
    folder = make_zoo('pm', cells=['V1A3'], norm_statistics={'method': 'patch-mean'})
    assert Zoo.open(folder).norm_statistics == PATCH_MEAN_DEFAULTS


def test_folded_norms_compute_the_frozen_network() -> None:
    network = _network(3)
    with torch.no_grad():
        network.head.weight.normal_(0, 0.3)
    volume = _head_in_air(shape=(32, 24, 16))
    statistics = patch_mean_statistics(
        network, volume, foreground_level=0.3, patch_size=16, patches=4
    )
    folded = network.with_folded_norms(statistics)
    assert not folded.norm_layers() and len(network.norm_layers()) == 6
    with torch.no_grad():
        with network.frozen_norm_statistics(statistics):
            expected = network(volume)
        got = folded(volume)
        plain = network(volume)  # the original is untouched
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (plain - expected).abs().max() > 1e-3
    assert folded.receptive_field_radius == network.receptive_field_radius


def test_batches_of_patches_give_the_same_statistics() -> None:
    network = _network(4)
    volume = _head_in_air(shape=(40, 40, 32))
    options = dict(foreground_level=0.3, patch_size=16, patches=5, seed=1)
    together = patch_mean_statistics(network, volume, **options)
    for batch_size in (1, 2):
        apart = patch_mean_statistics(network, volume, batch_size=batch_size, **options)
        assert together.max_relative_difference(apart) < 1e-4
