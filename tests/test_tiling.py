"""cahal_bids.engine.tiling: sliding windows, tile sizing and the out-of-memory fallback."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from cahal_bids.engine import tiling
from cahal_bids.engine.norm_statistics import estimate_norm_statistics
from cahal_bids.engine.tiling import (
    FALLBACK_CPU_BYTES,
    InsufficientMemoryError,
    available_memory_bytes,
    choose_tile_size,
    run_tiled_with_fallback,
    sliding_window_inference,
)

from helpers import random_net, smooth_volume

pytestmark = pytest.mark.usefixtures('one_thread')


def _relative_error(tiled: torch.Tensor, whole: torch.Tensor) -> float:
    return float((tiled - whole).abs().max() / (whole.max() - whole.min()))


# --- analytic predictors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ('tile', 'overlap', 'alignment', 'margin', 'batch'),
    [
        (8, 0.25, 1, 0, 1),
        ((7, 5, 9), 0.5, 1, 0, 3),
        (8, 0.0, 4, 0, 2),
        (16, 0.6, 8, 4, 1),
        ((12, 10, 6), 0.3, 2, 2, 4),
    ],
)
@pytest.mark.parametrize(
    'predictor', [lambda t: t + 1, lambda t: 2 * t, lambda t: t.square() - 3 * t]
)
def test_pointwise_predictors_are_reproduced_exactly(
    predictor, tile, overlap: float, alignment: int, margin: int, batch: int
) -> None:
    x = torch.randn(2, 3, 29, 23, 19, generator=torch.Generator().manual_seed(0))
    y = sliding_window_inference(
        x,
        predictor,
        tile_size=tile,
        overlap=overlap,
        batch_size=batch,
        alignment=alignment,
        margin=margin,
    )
    assert y.dtype == x.dtype
    assert torch.equal(y, predictor(x))


def test_tile_larger_than_volume_runs_whole() -> None:
    x = torch.rand(1, 1, 10, 12, 9)
    calls: list[tuple[int, ...]] = []

    def predictor(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t + 1

    y = sliding_window_inference(x, predictor, tile_size=(16, 12, 32))
    assert calls == [(1, 1, 10, 12, 9)]
    assert torch.equal(y, x + 1)


def test_only_long_axes_are_tiled_and_last_tile_is_flush() -> None:
    x = torch.zeros(1, 1, 30, 8, 8)
    origins: list[tuple[int, ...]] = []
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in (30, 8, 8)), indexing='ij')
    )[None]

    def predictor(t: torch.Tensor) -> torch.Tensor:
        origins.append(tuple(int(v) for v in t[0, :, 0, 0, 0]))
        assert t.shape == (1, 3, 12, 8, 8)
        return t

    sliding_window_inference(grid + x, predictor, tile_size=12, overlap=0.25, alignment=4)
    # 30 is padded to 32; stride round(12 * 0.75) = 9, rounded down to 8; last flush
    assert origins == [(0, 0, 0), (8, 0, 0), (16, 0, 0), (20, 0, 0)]


def test_unaligned_volume_is_padded_and_cropped() -> None:
    x = torch.rand(1, 1, 30, 9, 5)
    shapes: list[tuple[int, ...]] = []

    def predictor(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape[2:]))
        return 3 * t

    y = sliding_window_inference(x, predictor, tile_size=16, alignment=8)
    assert set(shapes) == {(16, 16, 8)}  # 30x9x5 padded to 32x16x8
    assert y.shape == x.shape
    assert torch.equal(y, 3 * x)


def test_predictor_may_change_channels_and_dtype() -> None:
    x = torch.rand(1, 2, 20, 18, 16)
    y = sliding_window_inference(
        x, lambda t: t.sum(1, keepdim=True).double(), tile_size=8, overlap=0.5
    )
    assert y.shape == (1, 1, 20, 18, 16)
    assert y.dtype == torch.float64
    assert torch.allclose(y, x.sum(1, keepdim=True).double(), atol=1e-12)


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    sliding_window_inference(torch.rand(1, 1, 16, 8, 8), lambda t: t, tile_size=8, progress=True)
    captured = capsys.readouterr()
    assert 'tiles' in captured.err
    assert captured.out == ''


@pytest.mark.parametrize(
    ('kwargs', 'match'),
    [
        ({'tile_size': 0}, 'tile_size'),
        ({'tile_size': (8, 8)}, 'tile_size'),
        ({'tile_size': 8, 'overlap': 1.0}, 'overlap'),
        ({'tile_size': 8, 'overlap': -0.1}, 'overlap'),
        ({'tile_size': 8, 'batch_size': 0}, 'batch_size'),
        ({'tile_size': 8, 'alignment': 0}, 'alignment'),
        ({'tile_size': 12, 'alignment': 8}, 'multiple of alignment'),
        ({'tile_size': 8, 'margin': -1}, 'margin'),
        ({'tile_size': 8, 'margin': 4}, 'margin'),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.rand(1, 1, 20, 20, 20), lambda t: t, **kwargs)


def test_bad_predictor_output_is_reported() -> None:
    x = torch.rand(1, 1, 20, 20, 20)
    with pytest.raises(ValueError, match='spatial sizes must be kept'):
        sliding_window_inference(x, lambda t: t[..., :-1], tile_size=8)
    with pytest.raises(ValueError, match='must have shape'):
        sliding_window_inference(torch.rand(20, 20, 20), lambda t: t, tile_size=8)


# --- a real network -----------------------------------------------------------------------


def test_unet_tiles_match_whole_volume_with_frozen_statistics_and_margin() -> None:
    """The engine's contract: tiled == whole within 1e-4 of the range, small volume.

    Needs all three: whole-volume norm statistics (frozen), tile origins aligned to the
    pooling grid, and a discarded margin of ``receptive_field_radius`` voxels. Measured
    with this net (levels=3, F=4, radius 26), 72x68x40, tile 64: 5e-7 of the range.
    """
    net = random_net(levels=3, initial_filters=4)
    x = smooth_volume((1, 1, 72, 68, 40))
    with torch.no_grad():
        whole = net(x)
        stats = estimate_norm_statistics(net, x)
        with net.frozen_norm_statistics(stats):
            tiled = sliding_window_inference(
                x,
                net,
                tile_size=64,
                overlap=0.25,
                alignment=net.size_multiple,
                margin=net.receptive_field_radius,
            )
    assert _relative_error(tiled, whole) <= 1e-4


def test_unet_tiles_with_blockwise_statistics_match_wholesmooth_volume() -> None:
    """The path for volumes too large to run whole: statistics from haloed blocks too."""
    net = random_net(levels=2, initial_filters=4)
    x = smooth_volume((1, 1, 40, 36, 28))
    with torch.no_grad():
        whole = net(x)
        stats = estimate_norm_statistics(net, x, block_size=32)  # cores of 12 for deep layers
        with net.frozen_norm_statistics(stats):
            tiled = sliding_window_inference(
                x, net, tile_size=32, overlap=0.0, alignment=2, margin=net.receptive_field_radius
            )
    assert _relative_error(tiled, whole) <= 1e-4


def test_unet_tiles_differ_without_frozen_statistics_or_margin() -> None:
    """Why the machinery above exists (levels=3, F=4, random weights, 40x36x44, tile 24).

    Measured relative errors (max |tiled - whole| / range of the whole output):

    * per-tile instance norm, no margin: 0.28 (overlap 0.25), 0.22 (0.5), 0.20 (0.75);
    * whole-volume statistics, no margin: 0.36 / 0.30 / 0.20 - the tile (24) is smaller
      than twice the receptive-field radius (26), so every output voxel sees a cut face;
    * 72x68x40, tile 64, aligned: per-tile norm 0.12 (margin 0) and 0.10 (margin 26);
      whole-volume statistics 0.078 (margin 0), 1.7e-3 (margin 16), 4e-7 (margin 26).

    A random network is a worst case (instance norm keeps every layer at unit scale);
    a trained expert, whose correction is small and local, will differ less, but only
    the frozen-statistics + margin path is exact by construction.
    """
    net = random_net(levels=3, initial_filters=4)
    x = smooth_volume((1, 1, 40, 36, 44))
    with torch.no_grad():
        whole = net(x)
        per_tile = sliding_window_inference(x, net, tile_size=24, overlap=0.5, alignment=4)
        with net.frozen_norm_statistics(estimate_norm_statistics(net, x)):
            frozen = sliding_window_inference(x, net, tile_size=24, overlap=0.5, alignment=4)
    assert _relative_error(per_tile, whole) > 1e-2
    assert _relative_error(frozen, whole) > 1e-2


def test_unet_tiles_need_aligned_origins() -> None:
    """A tile starting off the pooling grid differs everywhere: 0.18 measured below (41 is
    padded to 42 with ``alignment=2``, so the last tile starts at 10, not 9); 3e-7 aligned.
    """
    net = random_net(levels=2, initial_filters=4)
    x = smooth_volume((1, 1, 41, 30, 20))
    margin = net.receptive_field_radius
    with torch.no_grad():
        whole = net(x)
        with net.frozen_norm_statistics(estimate_norm_statistics(net, x)):
            errors = [
                _relative_error(
                    sliding_window_inference(x, net, tile_size=32, alignment=a, margin=margin),
                    whole,
                )
                for a in (1, 2)
            ]
    assert errors[0] > 1e-2
    assert errors[1] <= 1e-4


def test_tiled_inference_is_deterministic() -> None:
    net = random_net(levels=2, initial_filters=4)
    x = smooth_volume((1, 1, 30, 26, 22))
    with torch.no_grad():
        runs = [
            sliding_window_inference(x, net, tile_size=16, overlap=0.5, batch_size=2)
            for _ in range(2)
        ]
    assert runs[0].numpy().tobytes() == runs[1].numpy().tobytes()


# --- tile sizing --------------------------------------------------------------------------


def test_choose_tile_size_shrinks_with_memory() -> None:
    shape = (192, 224, 192)
    large = choose_tile_size(shape, 1925.0, 64 * 2**30)
    medium = choose_tile_size(shape, 1925.0, 8 * 2**30)
    small = choose_tile_size(shape, 1925.0, 1 * 2**30)
    assert large == (192, 224, 192)  # the whole volume fits
    assert medium[0] == medium[1] == medium[2] < 192
    assert small[0] < medium[0]
    for tile in (medium, small):
        assert all(t % 8 == 0 for t in tile)
        assert tile[0] ** 3 * 1925.0 <= 0.6 * (8 if tile is medium else 1) * 2**30
        assert (tile[0] + 8) ** 3 * 1925.0 > 0.6 * (8 if tile is medium else 1) * 2**30


def test_choose_tile_size_caps_at_volume_rounded_up() -> None:
    assert choose_tile_size((20, 300, 33), 100.0, 2**40) == (24, 304, 40)
    assert choose_tile_size((20, 300, 33), 100.0, 2**40, multiple=16) == (32, 304, 48)
    assert choose_tile_size((10, 12, 9), 100.0, 2**40) == (16, 16, 16)


def test_choose_tile_size_raises_when_nothing_fits() -> None:
    with pytest.raises(InsufficientMemoryError, match='32\\^3 tile') as raised:
        choose_tile_size((192, 224, 192), 1925.0, 64 * 2**20)
    assert isinstance(raised.value, MemoryError)
    with pytest.raises(ValueError, match='bytes_per_voxel'):
        choose_tile_size((10, 10, 10), 0.0, 2**30)
    with pytest.raises(ValueError, match='volume_shape'):
        choose_tile_size((10, 10), 1.0, 2**30)


# --- memory probing -----------------------------------------------------------------------


def test_available_memory_on_cpu_is_plausible() -> None:
    free = available_memory_bytes(torch.device('cpu'))
    assert free > 0
    meminfo = Path('/proc/meminfo')
    if meminfo.exists():
        total = int(meminfo.read_text().split('MemTotal:')[1].split()[0]) * 1024
        assert free <= total
    assert available_memory_bytes('meta') == FALLBACK_CPU_BYTES


def test_available_memory_falls_back_without_meminfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiling, 'available_system_memory_bytes', lambda: None)
    monkeypatch.setattr(tiling, '_cgroup_free_bytes', lambda: None)
    monkeypatch.setitem(sys.modules, 'psutil', None)  # import fails
    assert available_memory_bytes('cpu') == FALLBACK_CPU_BYTES


def test_cgroup_limit_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / 'memory.max').write_text('1073741824\n')
    (tmp_path / 'memory.current').write_text('268435456\n')
    assert tiling._cgroup_free_bytes(tmp_path) == 3 * 2**28
    (tmp_path / 'memory.max').write_text('max\n')
    assert tiling._cgroup_free_bytes(tmp_path) is None
    monkeypatch.setattr(tiling, '_cgroup_free_bytes', lambda: 2**20)
    monkeypatch.setattr(tiling.os.path, 'isdir', lambda path: True)
    monkeypatch.setattr(tiling.sys, 'platform', 'linux')
    assert available_memory_bytes('cpu') == 2**20


# --- out-of-memory fallback ---------------------------------------------------------------


class _SmallTilesOnly:
    """Predictor that fails like the CUDA allocator on tiles above ``limit`` voxels."""

    def __init__(self, limit: int, error: type[BaseException] = RuntimeError) -> None:
        self.limit = limit
        self.error = error
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(t.shape[2:]))
        if t[0, 0].numel() > self.limit:
            raise self.error('CUDA out of memory. Tried to allocate 2.00 GiB')
        return t + 1


def test_fallback_halves_tiles_until_they_fit(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.rand(1, 1, 70, 64, 60)
    predictor = _SmallTilesOnly(limit=32**3)
    with caplog.at_level(logging.WARNING, logger='cahal_bids.engine.tiling'):
        y, tile = run_tiled_with_fallback(
            x, predictor, tile_size=128, overlap=0.25, progress=False, min_size=16
        )
    assert tile == (32, 32, 32)  # whole (72x64x64), then 32^3 (36 is rounded down to 32)
    assert predictor.shapes[0] == (70, 64, 60)  # a tile covering the volume runs whole
    assert torch.equal(y, x + 1)
    messages = [r.getMessage() for r in caplog.records if r.name == 'cahal_bids.engine.tiling']
    assert len(messages) == 1
    assert 'Out of memory with tiles of 128x128x128' in messages[0]


@pytest.mark.parametrize('error', [torch.OutOfMemoryError, MemoryError])
def test_fallback_recognises_memory_errors(error: type[BaseException]) -> None:
    x = torch.rand(1, 1, 40, 40, 40)
    y, tile = run_tiled_with_fallback(
        x, _SmallTilesOnly(20**3, error), tile_size=40, overlap=0.25, progress=False, min_size=8
    )
    assert tile == (16, 16, 16)
    assert torch.equal(y, x + 1)


def test_fallback_keeps_room_for_the_margin() -> None:
    x = torch.rand(1, 1, 64, 64, 64)
    predictor = _SmallTilesOnly(20**3)
    with pytest.raises(RuntimeError, match='out of memory'):  # 16^3 would leave no span
        run_tiled_with_fallback(x, predictor, tile_size=64, min_size=8, margin=5)
    assert {shape[0] for shape in predictor.shapes} == {64, 32}
    y, tile = run_tiled_with_fallback(x, _SmallTilesOnly(40**3), tile_size=64, margin=5)
    assert tile == (32, 32, 32)
    assert torch.equal(y, x + 1)


def test_fallback_gives_up_at_min_size_and_ignores_other_errors() -> None:
    x = torch.rand(1, 1, 40, 40, 40)
    with pytest.raises(RuntimeError, match='out of memory'):
        run_tiled_with_fallback(
            x, _SmallTilesOnly(8**3), tile_size=64, overlap=0.25, progress=False, min_size=32
        )

    def broken(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError('shape mismatch')

    with pytest.raises(RuntimeError, match='shape mismatch'):
        run_tiled_with_fallback(x, broken, tile_size=64, overlap=0.25, progress=False)
