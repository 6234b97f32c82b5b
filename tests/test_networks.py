"""Tests of cahal_bids.engine.networks: the residual U-Net expert and its inference helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cahal_bids.engine.activation_memory import estimate_peak_bytes_per_voxel
from cahal_bids.engine.networks import FreezableInstanceNorm3d, ResidualUNet3D, count_parameters
from cahal_bids.engine.norm_statistics import estimate_norm_statistics

from helpers import random_net, smooth_volume

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('levels', [1, 2, 3, 4])
def test_output_shape_matches_odd_input(levels: int) -> None:
    net = random_net(levels=levels, initial_filters=4)
    x = smooth_volume((2, 1, 13, 17, 9))
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    assert not torch.equal(y, x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize('shape', [(1, 2, 11), (8, 8, 8), (1, 1, 1), (3, 5, 2)])
def test_tiny_axes_are_padded_by_replication(shape: tuple[int, int, int]) -> None:
    net = random_net(levels=4, initial_filters=4)
    with torch.no_grad():
        y = net(torch.rand(1, 1, *shape))
    assert y.shape == (1, 1, *shape)
    assert torch.isfinite(y).all()


def test_zero_init_head_is_exact_identity_and_trainable() -> None:
    net = ResidualUNet3D(levels=3, initial_filters=4)
    x = smooth_volume((1, 1, 13, 17, 9))
    y = net(x)
    assert torch.equal(y, x)
    (y - 2 * x).square().mean().backward()
    assert net.head.weight.grad is not None
    assert net.head.weight.grad.abs().sum() > 0


def test_non_residual_path_and_channels() -> None:
    net = ResidualUNet3D(
        in_channels=2, out_channels=3, levels=2, initial_filters=4, residual=False
    )
    x = smooth_volume((1, 2, 8, 9, 10))
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 3, 8, 9, 10)
    assert torch.equal(y, torch.zeros_like(y))  # zero head, no residual
    torch.nn.init.normal_(net.head.weight)
    with torch.no_grad():
        assert net(x).abs().sum() > 0


def test_wrong_input_shape_is_rejected() -> None:
    net = ResidualUNet3D(levels=2, initial_filters=4)
    with pytest.raises(ValueError, match='expected input'):
        net(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match='expected input'):
        net(torch.zeros(1, 8, 8, 8))


@pytest.mark.parametrize(
    ('name', 'value'),
    [
        ('in_channels', 0),
        ('in_channels', 1.0),
        ('out_channels', -1),
        ('levels', 0),
        ('levels', True),
        ('initial_filters', 0),
        ('initial_filters', '64'),
        ('convolutions_per_level', 0),
        ('negative_slope', -0.1),
        ('negative_slope', 1.0),
        ('negative_slope', float('nan')),
        ('negative_slope', True),
        ('residual', 1),
        ('zero_init_head', None),
    ],
)
def test_invalid_hyperparameters_raise_naming_them(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        ResidualUNet3D(**{name: value})  # type: ignore[arg-type]


def test_residual_needs_matching_channels() -> None:
    with pytest.raises(ValueError, match='in_channels == out_channels'):
        ResidualUNet3D(in_channels=1, out_channels=2)


def test_config_round_trip() -> None:
    net = ResidualUNet3D(levels=3, initial_filters=6, convolutions_per_level=1, negative_slope=0.2)
    config = json.loads(json.dumps(net.config()))
    clone = ResidualUNet3D.from_config(config)
    assert clone.config() == net.config()
    clone.load_state_dict(net.state_dict())  # same architecture, same keys
    assert ResidualUNet3D.from_config({}).config() == ResidualUNet3D().config()
    with pytest.raises(ValueError, match='unknown ResidualUNet3D config keys: filters'):
        ResidualUNet3D.from_config({'filters': 8})
    with pytest.raises(ValueError, match='levels'):
        ResidualUNet3D.from_config({'levels': -1})


def test_norm_state_dict_matches_plain_instance_norm() -> None:
    norm = FreezableInstanceNorm3d(5)
    assert set(norm.state_dict()) == set(torch.nn.InstanceNorm3d(5, affine=True).state_dict())


def _formula(f: int, levels: int = 4, n: int = 2, c: int = 1) -> int:
    """Parameters of the design: bias-free 3x3x3 convs, affine IN, 2x2x2 up-convs, 1x1 head."""
    widths = [f * 2**level for level in range(levels)]
    total = 0
    for level, w in enumerate(widths):  # encoder
        cin = c if level == 0 else widths[level - 1]
        total += 27 * (cin * w + (n - 1) * w * w) + 2 * n * w
    for level in range(levels - 1):  # decoder
        w = widths[level]
        total += 8 * widths[level + 1] * w + w  # up-convolution with bias
        total += 27 * (2 * w * w + (n - 1) * w * w) + 2 * n * w
    return total + widths[0] * c + c


@pytest.mark.parametrize(('filters', 'millions'), [(8, 0.35), (16, 1.40)])
def test_parameter_counts_match_known_figures(filters: int, millions: float) -> None:
    count = count_parameters(ResidualUNet3D(initial_filters=filters))
    assert count == _formula(filters)
    assert count / 1e6 == pytest.approx(millions, abs=0.005)


def test_count_parameters_trainable_only() -> None:
    net = ResidualUNet3D(levels=2, initial_filters=4)
    total = count_parameters(net)
    net.head.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == total - 4 - 1


def test_paper_size_network_runs_on_small_input() -> None:
    net = ResidualUNet3D()  # levels=4, initial_filters=64
    assert count_parameters(net) == _formula(64)
    x = smooth_volume((1, 1, 16, 16, 16))
    with torch.no_grad():
        y = net(x)
    assert torch.equal(y, x)


def test_forward_is_deterministic() -> None:
    net = random_net(levels=3, initial_filters=4)
    x = smooth_volume((1, 1, 20, 18, 22))
    with torch.no_grad():
        assert net(x).numpy().tobytes() == net(x).numpy().tobytes()


def test_receptive_field_radius_bounds_the_reach() -> None:
    """Beyond ``receptive_field_radius`` of a cut, a cropped input gives exact outputs."""
    net = random_net(levels=3, initial_filters=4)
    radius = net.receptive_field_radius
    assert radius == 26
    assert net.norm_receptive_radii() == [1, 2, 5, 7, 13, 17, 21, 23, 25, 26]
    x = smooth_volume((1, 1, 16, 16, 72))
    with torch.no_grad():
        whole = net(x)
        with net.frozen_norm_statistics(estimate_norm_statistics(net, x)):
            part = net(x[..., :48])
    error = (part - whole[..., :48]).abs().amax(dim=(0, 1, 2, 3))
    scale = float(whole.max() - whole.min())
    assert float(error[: 48 - radius].max()) <= 1e-5 * scale
    assert float(error[48 - radius // 2 :].min()) > 1e-3 * scale  # the bound is not loose


def test_frozen_whole_statistics_reproduce_instance_norm() -> None:
    net = random_net(levels=3, initial_filters=4)
    x = smooth_volume((1, 1, 20, 18, 22))  # padded to 20x20x24 inside
    with torch.no_grad():
        expected = net(x)
        stats = estimate_norm_statistics(net, x)
        assert len(stats.layers) == len(net.norm_layers()) == 10
        with net.frozen_norm_statistics(stats):
            frozen = net(x)
            other = net(smooth_volume((1, 1, 20, 18, 22), seed=1))
        assert net.norm_layers()[0]._frozen is None  # restored on exit
    scale = float(expected.max() - expected.min())
    assert float((frozen - expected).abs().max()) <= 1e-5 * scale
    assert float((other - expected).abs().max()) > 1e-2 * scale


@pytest.mark.parametrize(
    ('levels', 'shape', 'block'), [(2, (48, 20, 18), 32), (3, (72, 24, 20), 64)]
)
def test_blockwise_statistics_equal_whole_statistics(
    levels: int, shape: tuple[int, int, int], block: int
) -> None:
    net = random_net(levels=levels, initial_filters=4)
    x = smooth_volume((1, 1, *shape))
    with torch.no_grad():
        whole = estimate_norm_statistics(net, x)
        blocks = estimate_norm_statistics(net, x, block_size=block)  # exact halos
        rough = estimate_norm_statistics(net, x, block_size=block, halo=net.size_multiple)
    assert blocks.max_relative_difference(whole) < 1e-4
    assert rough.max_relative_difference(whole) > 1e-2  # a short halo is approximate


def test_blockwise_statistics_validation() -> None:
    net = ResidualUNet3D(levels=3, initial_filters=4)
    x = smooth_volume((1, 1, 80, 20, 16))
    with pytest.raises(ValueError, match='no core'):
        estimate_norm_statistics(net, x, block_size=56)  # halo 28 for the deepest layers
    with pytest.raises(ValueError, match='block_size'):
        estimate_norm_statistics(net, x, block_size=30)
    with pytest.raises(ValueError, match='halo'):
        estimate_norm_statistics(net, x, block_size=64, halo=6)
    with pytest.raises(ValueError, match='volume'):
        estimate_norm_statistics(net, torch.zeros(2, 1, 8, 8, 8))
    small = ResidualUNet3D(levels=2, initial_filters=4)
    with pytest.raises(ValueError, match='layers'):
        with net.frozen_norm_statistics(estimate_norm_statistics(small, x)):
            pass


def test_peak_estimate_scales_with_width_and_dtype() -> None:
    small = estimate_peak_bytes_per_voxel({'initial_filters': 8})
    assert estimate_peak_bytes_per_voxel({'initial_filters': 16}) > 1.8 * small
    assert estimate_peak_bytes_per_voxel({'initial_filters': 8}, torch.bfloat16) == small / 2
    net = ResidualUNet3D(initial_filters=8)
    assert estimate_peak_bytes_per_voxel(net) == small
    with pytest.raises(ValueError, match='unknown'):
        estimate_peak_bytes_per_voxel({'width': 8})


_PROBE = textwrap.dedent(
    """
    import sys, torch
    from cahal_bids.engine.networks import ResidualUNet3D

    def status(key):
        with open('/proc/self/status') as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(key))

    filters, levels, n = map(int, sys.argv[1:4])
    net = ResidualUNet3D(initial_filters=filters, levels=levels, zero_init_head=False).eval()
    with torch.no_grad():
        net(torch.rand(1, 1, 16, 16, 16))  # load kernels, start threads
        x = torch.rand(1, 1, n, n, n)
        with open('/proc/self/clear_refs', 'w') as handle:
            handle.write('5')  # reset the peak (VmHWM) to the current RSS
        before = status('VmRSS:')
        net(x)
        after = status('VmHWM:')
    print((after - before) * 1024 / n**3)
    """
)


@pytest.mark.skipif(
    not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc peak-RSS reset'
)
@pytest.mark.parametrize(('filters', 'levels', 'n'), [(8, 4, 96), (16, 3, 64)])
def test_peak_estimate_against_measured_rss(filters: int, levels: int, n: int) -> None:
    """Peak RSS growth of a fresh process during one forward vs the estimate.

    The peak is read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``:
    ``ru_maxrss`` is unusable here, because a child inherits it from its parent across
    fork and exec, so under a grown pytest process the growth read as 0. glibc is told to
    serve every block over 64 KiB by mmap from one arena, so freed tensors are unmapped
    and the high-water mark sees every peak. At 48^3 and below, a fixed 60-100 MB that
    does not scale with the volume (oneDNN scratch and kernels for new shapes) dominates
    (~1100-2100 B/voxel for F=8), so the sizes here are larger.
    Measured on the 2-core dev machine (B/voxel, estimate in brackets): F=8/L4 at 96^3
    220 (245), F=16/L3 at 64^3 390-410 (485), F=32/L4 at 64^3 732 (965); the paper net on
    192x224x192 peaked at ~1660 B/voxel of process RSS (notes) against an estimate of 1925.
    """
    env = dict(
        os.environ, MALLOC_ARENA_MAX='1', MALLOC_MMAP_THRESHOLD_='65536', OMP_NUM_THREADS='1'
    )
    done = subprocess.run(
        [sys.executable, '-c', _PROBE, str(filters), str(levels), str(n)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    measured = float(done.stdout.strip())
    estimate = estimate_peak_bytes_per_voxel({'initial_filters': filters, 'levels': levels})
    assert estimate >= measured / 1.3, (estimate, measured)
    assert estimate <= 4 * measured, (estimate, measured)
