#!/usr/bin/env python
"""Seconds per training step of one expert, in float32 and under bfloat16 autocast.

Runs :func:`cahal_bids.training.fit.fit` exactly as ``cahal-train fit`` does (pairs made on
the fly, edge-weighted MAE plus the float32 Fourier term, Adam, checkpoints) on a
synthetic head-sized volume, once per precision, and prints the mean step time after a
warm-up. On CPU the loop runs channels-last in both precisions (as ``fit`` does);
``--contiguous`` adds the float32 loop in the plain memory layout for comparison. Usage::

    python benchmarks/bench_train_step.py --filters 8 --threads 2 --steps 30 --contiguous
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
import torch

from cahal_bids.engine.networks import ResidualUNet3D
from cahal_bids.physics.acquisition import CellSampler
from cahal_bids.training.fit import TrainingSchedule, fit
from cahal_bids.training.losses import CahalLoss
from cahal_bids.training.pairs import (
    GroundTruthBlur,
    IntensityAugmentation,
    PairStream,
    TrainingVolume,
)

WARM_UP_STEPS = 3


def synthetic_head(shape: tuple[int, int, int] = (160, 192, 160)) -> TrainingVolume:
    """Nested ellipsoids with smooth texture: enough structure for realistic pairs."""
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grid))
    image = 0.3 * (radius < 0.9) + 0.4 * (radius < 0.7)
    image = image + 0.1 * np.sin(9 * grid[0]) * np.cos(7 * grid[1]) * (radius < 0.7)
    image = image + 0.01 * rng.standard_normal(shape, dtype=np.float32)
    return TrainingVolume(image=image.astype(np.float32), head_mask=radius < 0.9, name='head')


def seconds_per_step(
    volume: TrainingVolume,
    *,
    filters: int,
    steps: int,
    cell: str,
    precision: str,
    device: str,
    channels_last: bool | None = None,
) -> float:
    torch.manual_seed(0)
    network = ResidualUNet3D(levels=4, initial_filters=filters)
    stream = PairStream(
        [volume],
        CellSampler(cell),
        augmentation=IntensityAugmentation(),
        blur=GroundTruthBlur(0.6),
        seed=1,
    )
    loss = CahalLoss(fft_weight=2e-6, segmenter=None, seg_weight=0.0).to(device)
    with tempfile.TemporaryDirectory() as run_dir:
        fit(
            network,
            stream,
            loss,
            run_dir=run_dir,
            schedule=TrainingSchedule(max_steps=steps, learning_rate=1e-4),
            device=device,
            mixed_precision=precision == 'bf16',
            channels_last=channels_last,
            progress=False,
        )
        rows = list(csv.DictReader((Path(run_dir) / 'loss.csv').open()))
    start = float(rows[WARM_UP_STEPS - 1]['seconds'])
    return (float(rows[-1]['seconds']) - start) / (len(rows) - WARM_UP_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--filters', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--cell', default='V4A2')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--contiguous', action='store_true', help='also time fp32 without channels-last'
    )
    args = parser.parse_args()
    if args.steps <= WARM_UP_STEPS:
        parser.error(f'--steps must exceed the {WARM_UP_STEPS} warm-up steps')
    torch.set_num_threads(args.threads)
    volume = synthetic_head()
    print(f'{args.filters} filters, 4 levels, 2 x 64^3 patches, {args.threads} threads')
    runs = {'fp32': ('fp32', None), 'bf16': ('bf16', None)}
    if args.contiguous:
        runs = {'fp32, contiguous': ('fp32', False), **runs}
    times = {}
    for label, (precision, channels_last) in runs.items():
        times[label] = seconds_per_step(
            volume,
            filters=args.filters,
            steps=args.steps,
            cell=args.cell,
            precision=precision,
            device=args.device,
            channels_last=channels_last,
        )
        print(f'{label}: {times[label]:.3f} s per step', flush=True)
    for label in times:
        if label != 'bf16':
            print(f'bf16 speed-up over {label}: {times[label] / times["bf16"]:.2f}x')


if __name__ == '__main__':
    main()
