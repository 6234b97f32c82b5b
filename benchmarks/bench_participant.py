#!/usr/bin/env python
"""Wall time and peak memory of one full ``cahal-bids`` participant run on one image.

The image is the demo's (nilearn's MNI ICBM152 2009a T1w degraded to 1 x 1 x 4 mm with
the project's physics model, tilted and shifted): a one-participant BIDS dataset, run
with the shipped T1w zoo through denoising, CAHAL and ANTs rigid + affine registration
to the same template, from an empty work folder, in a fresh process. Peak memory is the
largest resident set of any process of the run (Nipype workers included). Prints a
Markdown table. Usage::

    python benchmarks/bench_participant.py [--nprocs 2] [--omp-nthreads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--nprocs', type=int, default=2)
    parser.add_argument('--omp-nthreads', type=int, default=1)
    args = parser.parse_args()

    from cahal_bids.demo import TEMPLATE_LABEL, make_demo_dataset, make_demo_template

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
        subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        sidecar = next((work / 'out').rglob('*desc-cahal_T1w.json'), None)
        enhance_s = (
            json.loads(sidecar.read_text()).get('CAHAL', {}).get('seconds') if sidecar else None
        )

    print(f'one 1 x 1 x 4 mm T1w, --nprocs {args.nprocs} --omp-nthreads {args.omp_nthreads}')
    print()
    print('| run | seconds | peak RSS (GiB) |')
    print('| --- | ---: | ---: |')
    print(f'| cahal-bids participant (denoise, CAHAL, affine) | {seconds:.0f} | {peak_gib:.2f} |')
    if enhance_s is not None:
        print(f'| of which the CAHAL node (its sidecar) | {enhance_s:.1f} | |')


if __name__ == '__main__':
    main()
