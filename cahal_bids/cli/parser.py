"""The ``cahal-bids`` command line: its argument parser and the checks of its options.

As in fMRIPrep, the parser lives here and :mod:`cahal_bids.cli.run` holds ``main``. Heavy
modules are imported inside the checks, so ``cahal-bids --help`` stays instant.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cahal_bids.cli.common import make_parser, positive_int, projection_option, routed_contrast
from cahal_bids.engine.zoo import ROUTED_MODALITIES, route_table_text

__all__ = [
    'PROG',
    'build_parser',
    'check_paths',
    'check_participant_options',
    'memory_gb',
    'parse_args',
    'template_label',
]

PROG = 'cahal-bids'


def memory_gb(text: str) -> float:
    """``argparse`` type for ``--mem``: megabytes by default, or with a K/M/G/T suffix.

    >>> memory_gb('8000'), memory_gb('8G'), memory_gb('16GB'), memory_gb('512m')
    (8.0, 8.0, 16.0, 0.512)
    """
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*', text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f'expected a memory size such as 8000 (MB), 8G or 16GB, got {text!r}'
        )
    value = float(match.group(1))
    scale = {'': 1 / 1000, 'k': 1e-6, 'm': 1 / 1000, 'g': 1.0, 't': 1000.0}
    return value * scale[match.group(2).lower()]


def _both_spellings(name: str) -> list[str]:
    dashed = '--' + name.replace('_', '-')
    underscored = '--' + name.replace('-', '_')
    return [dashed] if dashed == underscored else [dashed, underscored]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``cahal-bids`` (the command-line reference is generated from it)."""
    parser = make_parser(
        PROG,
        'Restore the low-resolution T1w, FLAIR and T2w images of a BIDS dataset to 1 mm in '
        'native space with CAHAL, register them to a template, and write BIDS derivatives. '
        f'The shipped zoos restore {route_table_text()}.',
    )
    parser.add_argument('bids_dir', type=Path, help='the root folder of a BIDS dataset')
    parser.add_argument('output_dir', type=Path, help='where derivatives are written')
    parser.add_argument(
        'analysis_level', choices=['participant', 'group'], help='processing stage to run'
    )
    select = parser.add_argument_group('selecting inputs')
    select.add_argument(
        *_both_spellings('participant-label'),
        dest='participant_label',
        nargs='+',
        metavar='LABEL',
        help='participants to process (with or without the "sub-" prefix; default all)',
    )
    select.add_argument(
        *_both_spellings('session-label'),
        dest='session_label',
        nargs='+',
        metavar='LABEL',
        help='sessions to process (with or without "ses-"; default all)',
    )
    select.add_argument(
        *_both_spellings('bids-filter-file'),
        dest='bids_filter_file',
        type=Path,
        metavar='FILE',
        help='JSON of PyBIDS filters per query ("t1w", "flair", "t2w") that refine the selection',
    )
    select.add_argument(
        '--modalities',
        nargs='+',
        type=routed_contrast,
        choices=ROUTED_MODALITIES,
        default=list(ROUTED_MODALITIES),
        metavar='SUFFIX',
        help='which images to enhance, by BIDS suffix: %(choices)s (default: all)',
    )
    select.add_argument(
        *_both_spellings('skip-bids-validation'),
        dest='skip_bids_validation',
        action='store_true',
        help='do not validate the input dataset',
    )
    select.add_argument(
        *_both_spellings('bids-database-dir'),
        dest='bids_database_dir',
        type=Path,
        metavar='DIR',
        help='where PyBIDS keeps its index (reused across runs; outside the dataset)',
    )
    resources = parser.add_argument_group('resources')
    resources.add_argument(
        '-w',
        *_both_spellings('work-dir'),
        dest='work_dir',
        type=Path,
        metavar='DIR',
        help='Nipype work folder; reruns with the same one resume (default: ./work)',
    )
    resources.add_argument(
        *_both_spellings('nprocs'),
        *_both_spellings('n-cpus'),
        dest='nprocs',
        type=positive_int,
        help='processes run in parallel (default: all available CPUs)',
    )
    resources.add_argument(
        *_both_spellings('omp-nthreads'),
        dest='omp_nthreads',
        type=positive_int,
        help='threads per process (default: nprocs - 1, at most 8)',
    )
    resources.add_argument(
        *_both_spellings('mem'),
        *_both_spellings('mem-mb'),
        dest='mem_gb',
        type=memory_gb,
        metavar='MEM',
        help='memory limit (MB, or with a G suffix) for scheduling nodes',
    )
    resources.add_argument(
        *_both_spellings('use-plugin'),
        dest='use_plugin',
        type=Path,
        metavar='FILE',
        help='Nipype plugin YAML (e.g. plugin: SLURM with plugin_args)',
    )
    resources.add_argument(
        '--device',
        choices=['auto', 'cpu', 'cuda'],
        default='auto',
        help='where the experts run (default: CUDA when available)',
    )
    resources.add_argument(
        '--precision',
        choices=['auto', 'fp32', 'bf16'],
        default='auto',
        help='expert arithmetic; auto (default) is bf16 where the CPU or GPU computes it '
        'natively (about twice as fast), else fp32',
    )
    processing = parser.add_argument_group('processing')
    processing.add_argument(
        '--zoo',
        nargs='+',
        type=Path,
        default=[],
        metavar='PATH',
        help='expert zoo folder(s); each manifest names its modality and serves that '
        'contrast, and also the contrasts the route table sends to a shipped zoo of that '
        'modality unless a zoo of their own is given (default: shipped zoos)',
    )
    processing.add_argument(
        *_both_spellings('no-denoise'),
        dest='no_denoise',
        action='store_true',
        help='skip the non-local means denoising before enhancement',
    )
    processing.add_argument(
        *_both_spellings('consistency-projection'),
        dest='consistency_projection',
        **projection_option(),
    )
    processing.add_argument(
        *_both_spellings('skip-registration'),
        dest='skip_registration',
        action='store_true',
        help='do not register to the template (no transforms are written)',
    )
    processing.add_argument(
        '--template',
        default='MNI152NLin2009cAsym',
        help='TemplateFlow template ID, read from TEMPLATEFLOW_HOME (default %(default)s)',
    )
    processing.add_argument(
        *_both_spellings('template-file'),
        dest='template_file',
        type=Path,
        metavar='PATH',
        help='register to this image instead of a TemplateFlow template',
    )
    processing.add_argument(
        *_both_spellings('template-name'),
        dest='template_name',
        metavar='LABEL',
        help='space label of --template-file (default: its file name)',
    )
    processing.add_argument(
        *_both_spellings('output-spaces'),
        dest='output_spaces',
        action='store_true',
        help='also write the enhanced image resampled into the template',
    )
    processing.add_argument(
        *_both_spellings('write-intermediate'),
        dest='write_intermediate',
        action='store_true',
        help='also write the denoised input (desc-denoised)',
    )
    processing.add_argument(
        '--sloppy',
        action='store_true',
        help="ANTs' fast registration presets (testing and previews only)",
    )
    processing.add_argument(
        *_both_spellings('random-seed'),
        dest='random_seed',
        type=int,
        default=0,
        help='the one seed of every random step (default 0)',
    )
    other = parser.add_argument_group('run control')
    other.add_argument(
        *_both_spellings('stop-on-first-crash'),
        dest='stop_on_first_crash',
        action='store_true',
        help='stop at the first failure instead of finishing the rest',
    )
    other.add_argument(
        *_both_spellings('write-graph'),
        dest='write_graph',
        action='store_true',
        help='write the workflow graph into the work folder',
    )
    other.add_argument(
        *_both_spellings('boilerplate-only'),
        dest='boilerplate_only',
        action='store_true',
        help='write logs/CITATION.md and exit',
    )
    other.add_argument(
        '--notrack',
        action='store_true',
        help='accepted for compatibility: cahal-bids never sends anything anywhere',
    )
    other.add_argument(
        '-v',
        '--verbose',
        dest='verbose',
        action='count',
        default=0,
        help='more log messages (repeat for more)',
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line (``argv``, default ``sys.argv[1:]``); exits 2 on bad usage."""
    return build_parser().parse_args(argv)


def check_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The absolute input and output folders, checked (an existing dataset, output outside).

    Raises :class:`~cahal_bids.app.bids.BIDSInputError` with the offending folder.
    """
    from cahal_bids.app.bids import BIDSInputError, check_output_dir

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    if not bids_dir.is_dir():
        raise BIDSInputError(f'{args.bids_dir}: the BIDS dataset folder does not exist')
    check_output_dir(bids_dir, output_dir)
    return bids_dir, output_dir


def check_participant_options(
    args: argparse.Namespace, bids_dir: Path, work_dir: Path
) -> dict[str, dict[str, Any]]:
    """Check the folders a participant run writes to, and read ``--bids-filter-file``.

    Returns the PyBIDS filters; raises :class:`~cahal_bids.app.bids.BIDSInputError`.
    """
    from cahal_bids.app.bids import BIDSInputError, load_bids_filters

    for folder, what in ((work_dir, 'work'), (args.bids_database_dir, 'BIDS database')):
        if folder is not None and (
            folder.resolve() == bids_dir or bids_dir in folder.resolve().parents
        ):
            raise BIDSInputError(f'{folder}: the {what} folder must be outside the dataset')
    return load_bids_filters(args.bids_filter_file)


def template_label(args: argparse.Namespace) -> str:
    """The space label of the registration target: ``--template``, or that of ``--template-file``.

    >>> template_label(argparse.Namespace(template='MNI152NLin2009cAsym', template_file=None))
    'MNI152NLin2009cAsym'
    >>> template_label(argparse.Namespace(
    ...     template='MNI152NLin2009cAsym', template_file=Path('tpl-My_Brain.nii.gz'),
    ...     template_name=None))
    'tplMyBrain'
    """
    if args.template_file is None:
        return args.template
    return (
        args.template_name
        or re.sub(r'[^A-Za-z0-9]', '', args.template_file.name.split('.')[0])
        or 'custom'
    )
