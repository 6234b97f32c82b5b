"""Time on-the-fly training pairs: a random cell triplet plus the degradation model.

Three cases, each timed ``--repeats`` times after one warm-up, a fresh random cell
and triplet every time:

* ``patch, shared``: a batch of ``--batch`` patches of ``--patch``^3 voxels
  degraded in one call (one geometry for the whole batch);
* ``patch, per sample``: the same batch, one call (one geometry) per patch;
* ``volume``: one ``size x 1.2 size x size`` volume (160 x 192 x 160 by default).

Prints one table of milliseconds per training pair (median and best).

Usage::

    python benchmarks/bench_degradation.py --size 160 --batch 2 --repeats 5 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def _time(step: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=160, help='volume is size x 1.2 size x size')
    parser.add_argument('--patch', type=int, default=96, help='cubic patch side in voxels')
    parser.add_argument('--batch', type=int, default=2, help='patches per batch')
    parser.add_argument('--repeats', type=int, default=5, help='timed repeats per case')
    parser.add_argument('--device', default='cpu', help="torch device, e.g. 'cpu' or 'cuda'")
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from cahal_bids.core.routing import CELLS
    from cahal_bids.physics.acquisition import CellSampler
    from cahal_bids.physics.degradation import RandomDegrade

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rng = np.random.default_rng(args.seed)
    transforms = {cell: RandomDegrade(CellSampler(cell)) for cell in CELLS}

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    def pair(volume: torch.Tensor) -> torch.Tensor:
        cell = CELLS[int(rng.integers(len(CELLS)))]
        degraded, _ = transforms[cell](volume, rng)
        return degraded

    generator = torch.Generator().manual_seed(args.seed)
    patches = torch.rand(args.batch, 1, *(args.patch,) * 3, generator=generator, dtype=dtype)
    patches = patches.to(device)
    shape = (args.size, round(1.2 * args.size), args.size)
    volume = torch.rand(1, 1, *shape, generator=generator, dtype=dtype).to(device)

    cases = [
        (f'patch {args.patch}^3, shared', f'{args.batch}x1x{args.patch}^3', args.batch,
         lambda: pair(patches)),
        (f'patch {args.patch}^3, per sample', f'{args.batch}x1x{args.patch}^3', args.batch,
         lambda: [pair(patches[i : i + 1]) for i in range(args.batch)]),
        ('volume', 'x'.join(map(str, shape)), 1, lambda: pair(volume)),
    ]  # fmt: skip
    print(f'device={device} dtype={args.dtype} repeats={args.repeats}')
    print(f'{"case":<28} {"input":<18} {"median ms/pair":>15} {"best ms/pair":>13}')
    for name, described, pairs, step in cases:
        times = _time(step, args.repeats, sync)
        median = 1e3 * statistics.median(times) / pairs
        best = 1e3 * min(times) / pairs
        print(f'{name:<28} {described:<18} {median:>15.1f} {best:>13.1f}')


if __name__ == '__main__':
    main()
