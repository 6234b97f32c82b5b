"""``cahal-train prepare``: denoise, resample and label the high-resolution images of BIDS data.

Wire it into a parser with :func:`add_prepare_arguments` and run it with
:func:`run_prepare`. Images are prepared one after another into ``--cache-dir``
(see :mod:`cahal_bids.training.preparation`); entries already prepared with the same
source and parameters are reused. Exit codes: 0 every image prepared, 1 at least
one image failed (the others are still prepared; one line on stderr per failure,
naming the file), 2 usage errors (bad folder, unknown subject, a subject both
requested and excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cahal_bids.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, positive_int, report_error
from cahal_bids.core.modalities import MODALITIES

PROG = 'cahal-train prepare'


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare`` options to ``parser`` (a subcommand parser) and return it."""
    parser.description = (
        'Prepare training ground truth from high-resolution images: non-local-means '
        'denoising, cubic B-spline resampling to the native 1 mm grid, RAS reorientation, '
        'robust intensity normalisation, head and brain masks, and proxy CSF/GM/WM labels. '
        'Results are cached per image in --cache-dir with a manifest.json.'
    )
    parser.add_argument('bids_dir', type=Path, help='BIDS folder of high-resolution images')
    parser.add_argument(
        '--cache-dir', '--cache_dir', type=Path, required=True, help='where prepared images go'
    )
    parser.add_argument(
        '--modality',
        choices=MODALITIES,
        default='T1w',
        help='BIDS suffix of the images to prepare (default: %(default)s)',
    )
    parser.add_argument(
        '--participant-label',
        '--participant_label',
        nargs='+',
        metavar='LABEL',
        help='subjects to prepare, with or without "sub-" (default: all)',
    )
    parser.add_argument(
        '--exclude-participant',
        '--exclude_participant',
        nargs='*',
        metavar='LABEL',
        default=None,
        help='subjects never prepared (default: the validation split of ../shared/data/hr, '
        'sub-stroke01, sub-philips01 and sub-arc2265: never train on them; give the option '
        'with no label to exclude nobody)',
    )
    parser.add_argument(
        '--no-denoise', '--no_denoise', action='store_true', help='skip non-local-means denoising'
    )
    parser.add_argument(
        '--shrink-factor',
        '--shrink_factor',
        type=positive_int,
        default=1,
        help="denoiser's internal downsampling; 2 is ~3x faster, 1 full quality "
        '(default: %(default)s)',
    )
    parser.add_argument(
        '--brain-extracted',
        '--brain_extracted',
        choices=('auto', 'yes', 'no'),
        default='auto',
        help='whether the images are skull-stripped (default: %(default)s, detected per image)',
    )
    parser.add_argument(
        '--seed', type=int, default=0, help='random seed for ANTs (default: %(default)s)'
    )
    parser.add_argument(
        '--threads',
        type=positive_int,
        default=None,
        help='ITK threads for ANTs; 1 makes the results bit-reproducible '
        '(default: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS or all cores)',
    )
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress lines')
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` with parsed ``args``; returns the exit code."""
    if args.threads is not None:
        # Read once by ITK at its first use in the process: set before importing ANTs.
        os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(args.threads)

    from cahal_bids.core.errors import CahalError
    from cahal_bids.training.discovery import VALIDATION_SUBJECTS
    from cahal_bids.training.preparation import (
        PreparationError,
        PreparedVolume,
        find_images,
        prepare_dataset,
    )

    brain_extracted = {'auto': None, 'yes': True, 'no': False}[args.brain_extracted]
    excluded = args.exclude_participant
    if excluded is None:
        excluded = VALIDATION_SUBJECTS
    try:
        images = find_images(
            args.bids_dir,
            modality=args.modality,
            subjects=args.participant_label,
            exclude_subjects=excluded,
        )
    except PreparationError as exc:
        report_error(PROG, str(exc))
        return EXIT_USAGE
    if not images:
        report_error(PROG, f'{args.bids_dir}: no *_{args.modality} images to prepare')
        return EXIT_USAGE

    failures: list[str] = []
    count = len(images)
    done = 0

    def _failed(source: Path, exc: Exception) -> None:
        message = str(exc)
        if str(source) not in message:
            message = f'{source}: {message}'
        failures.append(message)
        report_error(PROG, message)

    def _prepared(item: PreparedVolume) -> None:
        nonlocal done
        done += 1
        for warning in item.metadata.get('warnings', []):
            print(f'{PROG}: warning: {warning}', file=sys.stderr)
        if not args.quiet:
            volumes = item.metadata['volumes_ml']
            seconds = item.metadata['timings_s'].get('total', 0.0)
            how = 'cached' if item.from_cache else f'{seconds:.0f} s'
            print(
                f'[{done}/{count}] {item.source.name} -> {item.directory} '
                f'({how}; brain {volumes["brain"]:.0f} mL, CSF {volumes["CSF"]:.0f}, '
                f'GM {volumes["GM"]:.0f}, WM {volumes["WM"]:.0f})',
                flush=True,
            )

    try:
        prepare_dataset(
            args.bids_dir,
            args.cache_dir,
            modality=args.modality,
            subjects=args.participant_label,
            exclude_subjects=excluded,
            denoise=not args.no_denoise,
            shrink_factor=args.shrink_factor,
            brain_extracted=brain_extracted,
            seed=args.seed,
            on_error=_failed,
            on_prepared=_prepared,
        )
    except (CahalError, OSError) as exc:  # the manifest or cache folder cannot be written
        report_error(PROG, str(exc))
        return EXIT_FAILURE
    return EXIT_FAILURE if failures else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m cahal_bids.cli.train_prepare``)."""
    from cahal_bids.cli.common import make_parser

    parser = add_prepare_arguments(make_parser(PROG, ''))
    return run_prepare(parser.parse_args(argv))


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
