"""``cahal-train``: prepare ground truth and train expert zoos."""

from __future__ import annotations

from collections.abc import Sequence

from cahal_bids.cli.common import EXIT_USAGE, make_parser, not_built_yet

PROG = 'cahal-train'


def build_parser():
    parser = make_parser(PROG, 'Prepare ground truth and train CAHAL expert zoos.')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    commands.add_parser(
        'prepare', help='denoise, resample and label high-resolution images (not built yet)'
    )
    commands.add_parser('fit', help='train the experts of a zoo (not built yet)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage()
        return EXIT_USAGE
    return not_built_yet(PROG, f'`{PROG} {args.command}`')
