#!/usr/bin/env python
"""What bfloat16 costs in quality: validation PSNR of a zoo in fp32 and in bf16, per cell.

One simulated acquisition per cell (seeded) of a prepared ground truth, restored by the
same experts in float32 and under bfloat16 autocast; prints both PSNRs (head mask, as
``cahal-eval``), their difference and the largest voxel difference relative to the data
range. Usage::

    python benchmarks/bench_precision.py PREPARED/sub-stroke01_T1w --zoo cahal_bids/zoos/t1w
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cahal_bids.core.routing import CELLS
from cahal_bids.engine.inference import Enhancer
from cahal_bids.engine.zoo import Zoo
from cahal_bids.evaluation.protocol import acquire, cahal_method, psnr
from cahal_bids.physics.acquisition import sample_in_cell
from cahal_bids.training.preparation import PreparedVolume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('prepared', type=Path, help='a folder written by cahal-train prepare')
    parser.add_argument('--zoo', type=Path, required=True)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = PreparedVolume.load(args.prepared)
    truth, mask = entry.image(), entry.head_mask().astype(bool)
    data_range = float(truth[mask].max() - truth[mask].min())
    zoo = Zoo.open(args.zoo)
    methods = {
        precision: cahal_method(Enhancer(zoo, device=torch.device('cpu'), precision=precision))
        for precision in ('fp32', 'bf16')
    }
    print('| cell | fp32 PSNR | bf16 PSNR | difference | max voxel difference / range |')
    print('| --- | ---: | ---: | ---: | ---: |')
    differences = []
    for cell in CELLS:
        resolution = sample_in_cell(cell, np.random.default_rng(args.seed))
        low, low_affine = acquire(truth, entry.affine, resolution)
        out = {name: method(low, low_affine, resolution, truth.shape) for name, method in
               methods.items()}  # fmt: skip
        full, half = (psnr(truth, out[name], mask, data_range) for name in ('fp32', 'bf16'))
        largest = float(np.abs(out['fp32'] - out['bf16'])[mask].max()) / data_range
        differences.append(half - full)
        print(f'| {cell} | {full:.3f} | {half:.3f} | {half - full:+.3f} | {largest:.4f} |')
    print(
        f'\nbf16 - fp32: mean {np.mean(differences):+.4f} dB, worst {np.min(differences):+.4f} dB'
    )


if __name__ == '__main__':
    main()
