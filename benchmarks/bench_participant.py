#!/usr/bin/env python
"""Wall time and peak memory of one full ``cahal-bids`` participant run on one image.

The image is the demo's (nilearn's MNI ICBM152 2009a T1w degraded to 1 x 1 x 4 mm with
the project's physics model, tilted and shifted): a one-participant BIDS dataset, run
with the shipped T1w zoo through denoising, CAHAL and ANTs rigid + affine registration
to the same template, from an empty work folder, in a fresh process. Memory is sampled
from ``/proc`` every 0.2 s over the whole process tree (Nipype's forkserver workers
included): the peak of the tree's summed resident sets and the largest single process.
Linux only. Prints a Markdown table. Usage::

    python benchmarks/bench_participant.py [--nprocs 2] [--omp-nthreads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree_rss(root: int) -> tuple[int, int]:
    """(summed, largest) resident set in bytes of ``root`` and all its descendants."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf('SC_PAGE_SIZE')
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as stream:
                fields = stream.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * page
    tree = {root}
    changed = True
    while changed:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        changed = bool(children)
        tree |= children
    sizes = [rss.get(pid, 0) for pid in tree]
    return sum(sizes), max(sizes, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--nprocs', type=int, default=2)
    parser.add_argument('--omp-nthreads', type=int, default=1)
    args = parser.parse_args()

    from cahal_bids.cli.demo import TEMPLATE_LABEL, make_demo_dataset, make_demo_template

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        bids_dir = make_demo_dataset(work / 'bids')
        template = make_demo_template(work / f'tpl-{TEMPLATE_LABEL}_res-01_T1w.nii.gz')
        command = [
            str(Path(sys.executable).parent / 'cahal-bids'),
            str(bids_dir),
            str(work / 'out'),
            'participant',
            '--work-dir',
            str(work / 'work'),
            '--template-file',
            str(template),
            '--template-name',
            TEMPLATE_LABEL,
            '--nprocs',
            str(args.nprocs),
            '--omp-nthreads',
            str(args.omp_nthreads),
        ]
        start = time.perf_counter()
        log = open(work / 'log.txt', 'w')  # noqa: SIM115 - closed below
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        peak_sum = peak_one = 0
        while process.poll() is None:
            summed, largest = _tree_rss(process.pid)
            peak_sum, peak_one = max(peak_sum, summed), max(peak_one, largest)
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        log.close()
        if process.returncode != 0:
            sys.exit(
                f'cahal-bids failed ({process.returncode}):\n' + (work / 'log.txt').read_text()
            )
        sidecar = next((work / 'out').rglob('*desc-cahal_T1w.json'), None)
        enhance_s = (
            json.loads(sidecar.read_text()).get('CAHAL', {}).get('seconds') if sidecar else None
        )

    print(f'one 1 x 1 x 4 mm T1w, --nprocs {args.nprocs} --omp-nthreads {args.omp_nthreads}')
    print()
    print('| run | seconds | peak RSS, all processes (GiB) | largest process (GiB) |')
    print('| --- | ---: | ---: | ---: |')
    print(
        f'| cahal-bids participant (denoise, CAHAL, affine) | {seconds:.0f} | '
        f'{peak_sum / 2**30:.2f} | {peak_one / 2**30:.2f} |'
    )
    if enhance_s is not None:
        print(f'| of which the CAHAL node (its sidecar) | {enhance_s:.1f} | | |')


if __name__ == '__main__':
    main()
