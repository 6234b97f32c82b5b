"""``cahal-eval``: the paper's evaluation protocol on the user's own high-resolution images."""

from __future__ import annotations

from collections.abc import Sequence

from cahal_bids.cli.common import make_parser, not_built_yet

PROG = 'cahal-eval'


def build_parser():
    parser = make_parser(
        PROG, 'Evaluate expert zoos on high-resolution images degraded by the physics model.'
    )
    parser.add_argument('inputs', nargs='+', metavar='IMAGE', help='high-resolution images')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return not_built_yet(PROG, 'the evaluation protocol')
