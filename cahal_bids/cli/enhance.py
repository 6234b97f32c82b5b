"""``cahal-enhance``: restore one image to 1 mm in its native space.

Exit codes: 0 success, 1 processing failure, 2 usage error; every failure prints a
one-line reason on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cahal_bids.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    make_parser,
    positive_int,
    projection_option,
    report_error,
    routed_contrast,
)
from cahal_bids.engine.zoo import ROUTED_MODALITIES, route_table_text

PROG = 'cahal-enhance'


def default_threads() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_parser():
    parser = make_parser(
        PROG,
        'Restore a low-resolution T1w, FLAIR or T2w image to 1 mm isotropic in its own '
        'native space with one CAHAL expert chosen from its voxel size. The shipped zoos '
        f'restore {route_table_text()} (the sidecar records the route and the zoo that '
        'served it).\n\n'
        "The output keeps the input's voxel axes and field-of-view corner, with 1 mm "
        'spacing and round(n * r) voxels per axis. Images already at 1 mm or finer are '
        'written unchanged.',
    )
    parser.add_argument('input', type=Path, help='NIfTI image (.nii or .nii.gz)')
    parser.add_argument(
        'output',
        type=Path,
        nargs='?',
        help='output NIfTI path (a JSON sidecar is written beside it); not needed with --dry-run',
    )
    parser.add_argument(
        '--modality',
        type=routed_contrast,
        choices=ROUTED_MODALITIES,
        default='T1w',
        help='contrast of the input (its route); selects the shipped zoo that restores it '
        '(default: %(default)s)',
    )
    parser.add_argument(
        '--zoo',
        type=Path,
        help="an expert zoo folder instead of the shipped one; its manifest's modality must "
        "be the contrast of the input, or that of the shipped zoo the input's route uses",
    )
    parser.add_argument(
        '--device',
        choices=('auto', 'cpu', 'cuda'),
        default='auto',
        help='where the expert runs (default: %(default)s)',
    )
    parser.add_argument(
        '--threads',
        type=positive_int,
        default=None,
        help='CPU threads (default: the cores this process may use)',
    )
    parser.add_argument(
        '--tile-size',
        '--tile_size',
        type=positive_int,
        default=None,
        help='cubic tile edge in voxels (default: the largest that fits in free memory)',
    )
    parser.add_argument(
        '--dry-run',
        '--dry_run',
        action='store_true',
        help='only print the routing decision and output grid as JSON; needs no model',
    )
    parser.add_argument(
        '--precision',
        choices=('auto', 'fp32', 'bf16'),
        default='auto',
        help='arithmetic of the expert; auto (default) is bf16 where the CPU or GPU computes '
        'it natively (about twice as fast), else fp32',
    )
    parser.add_argument(
        '--consistency-projection',
        '--consistency_projection',
        **projection_option(),
    )
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bar')
    return parser


def dry_run_report(path: Path) -> dict[str, Any]:
    """What ``--dry-run`` prints: the header, the routing decision and the output grid."""
    import nibabel as nib

    from cahal_bids.core.grid import native_grid
    from cahal_bids.core.nifti import load_header
    from cahal_bids.core.routing import route

    header = load_header(path)
    decision = route(header.voxel_sizes)
    if decision.skip:
        grid_shape, grid_affine = header.shape, header.affine
    else:
        grid = native_grid(header.shape, header.affine)
        grid_shape, grid_affine = grid.shape, grid.affine
    return {
        'input': str(path),
        'shape': list(header.shape),
        'voxel_sizes': [round(r, 6) for r in header.voxel_sizes],
        'orientation': ''.join(nib.aff2axcodes(header.affine)),
        'routed_voxel_sizes': [round(r, 6) for r in decision.routed_sizes],
        'V': round(decision.volume, 6),
        'A': round(decision.anisotropy, 6),
        'cell': decision.cell,
        'skip': decision.skip,
        'output_grid': {
            'shape': [int(n) for n in grid_shape],
            'voxel_sizes': [1.0, 1.0, 1.0]
            if not decision.skip
            else [round(r, 6) for r in header.voxel_sizes],
            'affine': [[round(float(v), 6) for v in row] for row in grid_affine],
        },
        'warnings': list(header.warnings),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cahal_bids.core.errors import CahalError

    if not args.input.exists():
        report_error(PROG, f'{args.input}: input file not found')
        return EXIT_USAGE
    if args.dry_run:
        try:
            report = dry_run_report(args.input)
        except CahalError as error:
            report_error(PROG, str(error))
            return EXIT_FAILURE
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write('\n')
        return EXIT_OK
    if args.output is None:
        parser.print_usage(sys.stderr)
        report_error(PROG, 'OUTPUT is required unless --dry-run is given')
        return EXIT_USAGE
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        report_error(PROG, f'{args.output}: refusing to overwrite the input image')
        return EXIT_USAGE
    return _enhance(args)


def _enhance(args) -> int:
    import logging

    import torch

    from cahal_bids.core.errors import CahalError
    from cahal_bids.engine.inference import Enhancer, resolve_device
    from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path

    torch.set_num_threads(args.threads or default_threads())
    # the consistency guard's WARNING, as one line with the program's name
    logging.basicConfig(format=f'{PROG}: %(levelname)s: %(message)s', level=logging.WARNING)
    try:
        device = resolve_device(args.device)
        zoo = Zoo.open(args.zoo if args.zoo is not None else default_zoo_path(args.modality))
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    try:
        enhancer = Enhancer(
            zoo,
            device=device,
            tile_size=args.tile_size,
            progress=not args.quiet,
            precision=args.precision,
            contrast=args.modality,
            consistency_projection=args.consistency_projection,
        )
    except ZooError as error:  # the zoo does not serve this contrast
        report_error(PROG, f'{error}; pass --modality to match or another --zoo')
        return EXIT_USAGE
    try:
        result = enhancer.enhance_file(args.input, args.output)
    except ZooError as error:
        report_error(PROG, str(error))
        return EXIT_FAILURE
    except OSError as error:  # writing: a full disk, a read-only or missing folder, ...
        target = error.filename if error.filename else args.output
        report_error(PROG, f'{args.output}: cannot write the output ({error.strerror or error})'
                     + ('' if str(target) == str(args.output) else f' at {target}'))  # fmt: skip
        return EXIT_FAILURE
    except (CahalError, MemoryError) as error:
        report_error(
            PROG, f'{args.input}: {error}' if str(args.input) not in str(error) else str(error)
        )
        return EXIT_FAILURE
    if not args.quiet:
        what = 'copied unchanged (already 1 mm)' if result.sidecar['skipped'] else 'enhanced'
        print(
            f'{PROG}: {what}: {result.output_path} (sidecar {result.sidecar_path})',
            file=sys.stderr,
        )
    return EXIT_OK
