"""``cahal-bids``: the BIDS-App (``cahal-bids BIDS_DIR OUTPUT_DIR participant``).

``run.py``, ``python -m cahal_bids`` and the container entry point all call :func:`main`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cahal_bids.cli.common import make_parser, not_built_yet

PROG = 'cahal-bids'


def build_parser():
    parser = make_parser(
        PROG,
        'Restore the low-resolution T1w and FLAIR images of a BIDS dataset to 1 mm in native '
        'space with CAHAL, and write BIDS derivatives.',
    )
    parser.add_argument('bids_dir', type=Path, help='the root folder of a BIDS dataset')
    parser.add_argument('output_dir', type=Path, help='where derivatives are written')
    parser.add_argument(
        'analysis_level', choices=['participant', 'group'], help='processing stage to run'
    )
    parser.add_argument(
        '--participant-label',
        '--participant_label',
        nargs='+',
        metavar='LABEL',
        help='participants to process (with or without the "sub-" prefix)',
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return not_built_yet(PROG, 'the BIDS-App workflow')
