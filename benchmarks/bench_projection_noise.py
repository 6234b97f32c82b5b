#!/usr/bin/env python
"""Do the projections onto the acquired data still help when acquisitions are not the protocol's?

``cahal-eval``'s acquisitions are the exact, noise-free box point-spread function, which is
what the exact projection inverts, so there it cannot lower PSNR. Real acquisitions are
noisy and their slice profile is not a box. For one simulated resolution per cell (the
protocol's realization 0), this acquires a prepared ground truth five ways: the protocol's
box PSF; the same plus Gaussian noise of 2 % and of 4 % of the head's 99th intensity
percentile; that 2 % acquisition denoised as ``cahal-bids`` does before enhancement; a
wider slice profile (Gaussian of FWHM one voxel along every thick axis, then the box) plus
2 % noise. The expert restores each once; prints PSNR (head mask, as ``cahal-eval``) of
trilinear, cubic B-spline, the expert alone and the expert followed by the adaptive and by
the exact projection (``--consistency-projection adaptive`` / ``exact``), and the noise
level the adaptive projection estimated (% of the 99th percentile). The denoised
acquisition is also restored as ``cahal-bids`` restores it, the adaptive projection aimed
at the raw (noisy) acquisition (last column). Usage::

    python benchmarks/bench_projection_noise.py PREPARED/sub-philips01_T1w \\
        --zoo cahal_bids/zoos/t1w --cells V1A3 V2A2 V3A1 V4A2 V5A1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cahal_bids.core.noise import estimate_noise_sd
from cahal_bids.core.routing import CELLS, route
from cahal_bids.engine.inference import Enhancer
from cahal_bids.engine.zoo import Zoo
from cahal_bids.evaluation.protocol import (
    ADAPTIVE_METHOD,
    PROJECTED_METHOD,
    acquire,
    cahal_methods,
    cubic_bspline,
    psnr,
    trilinear,
)
from cahal_bids.physics.acquisition import sample_in_cell
from cahal_bids.preprocessing.denoising import nlm_denoise
from cahal_bids.preprocessing.masks import estimate_head_mask
from cahal_bids.training.prepared import PreparedVolume

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def acquisitions(
    truth: np.ndarray, affine: np.ndarray, resolution: tuple[float, ...], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The four acquisitions of one resolution (see the module docstring) and their affine."""
    scale = float(np.percentile(truth[truth > 0], 99))
    box, low_affine = acquire(truth, affine, resolution)
    sigmas = [r * FWHM_TO_SIGMA if r > 1.0 else 0.0 for r in resolution]
    wider = ndimage.gaussian_filter(truth, sigmas).astype(np.float32)
    wide, _ = acquire(wider, affine, resolution)

    def noisy(image: np.ndarray, fraction: float) -> np.ndarray:
        return (image + rng.normal(0.0, fraction * scale, image.shape)).astype(np.float32)

    two = noisy(box, 0.02)
    found = {
        'box': box,
        'box + 2 % noise': two,
        'box + 2 % noise, denoised': nlm_denoise(two, estimate_head_mask(two, resolution),
                                                 resolution, seed=0),
        'box + 4 % noise': noisy(box, 0.04),
        'wider profile + 2 % noise': noisy(wide, 0.02),
    }  # fmt: skip
    return found, low_affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('prepared', type=Path, nargs='+', help='folders of cahal-train prepare')
    parser.add_argument('--zoo', type=Path, required=True)
    parser.add_argument('--cells', nargs='+', default=['V1A3', 'V2A2', 'V3A1', 'V4A2', 'V5A1'])
    parser.add_argument('--seed', type=int, default=0, help='as cahal-eval --seed')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--json', type=Path, help='also write every figure here')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    enhancer = Enhancer(Zoo.open(args.zoo), consistency_projection='off')
    methods = {
        'trilinear': trilinear,
        'cubic': cubic_bspline,
        **cahal_methods(enhancer, projections=('adaptive', 'exact')),
    }
    rows = []
    print('| image | cell | acquisition | noise (%) | trilinear | cubic | expert alone '
          '| + adaptive | + exact | + adaptive, aimed at the raw acquisition |')  # fmt: skip
    print('| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for folder in args.prepared:
        entry = PreparedVolume.load(folder)
        truth, mask = entry.image(), entry.head_mask().astype(bool)
        data_range = float(truth[mask].max() - truth[mask].min())
        for cell in args.cells:
            # the protocol's realization 0 of the cell, as cahal-eval draws it
            case_seed = args.seed * 100_003 + CELLS.index(cell) * 101
            resolution = sample_in_cell(cell, np.random.default_rng(case_seed))
            found, low_affine = acquisitions(
                truth, entry.affine, resolution, np.random.default_rng(case_seed + 1)
            )
            for name, low in found.items():
                low = np.ascontiguousarray(low, dtype=np.float32)
                scores = {
                    method: psnr(truth, run(low, low_affine, resolution, truth.shape), mask,
                                 data_range)
                    for method, run in methods.items()
                }  # fmt: skip
                aimed = ''
                if name.endswith('denoised'):
                    raw = np.ascontiguousarray(found['box + 2 % noise'], dtype=np.float32)
                    restored, _, _ = enhancer.restore(
                        low, low_affine, route(resolution), projection='adaptive', acquired=raw
                    )
                    shape = truth.shape
                    restored = restored[: shape[0], : shape[1], : shape[2]]
                    scores['cahal+adaptive aimed at raw'] = psnr(truth, restored, mask, data_range)
                    aimed = f'{scores["cahal+adaptive aimed at raw"]:.2f}'
                scale = float(np.percentile(truth[truth > 0], 99))
                inside = low > 0.05 * np.percentile(low, 99.9)
                noise = estimate_noise_sd(low, resolution, inside)
                noise_pct = float('nan') if noise is None else 100 * noise / scale
                sizes = [round(r, 3) for r in resolution]
                rows.append({'image': entry.directory.name, 'cell': cell, 'acquisition': name,
                             'resolution': sizes, 'noise_pct': noise_pct, **scores})  # fmt: skip
                print(f'| {entry.directory.name} | {cell} | {name} | {noise_pct:.2f} | '
                      f'{scores["trilinear"]:.2f} | {scores["cubic"]:.2f} | '
                      f'{scores["cahal"]:.2f} | {scores[ADAPTIVE_METHOD]:.2f} | '
                      f'{scores[PROJECTED_METHOD]:.2f} | {aimed} |', flush=True)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
