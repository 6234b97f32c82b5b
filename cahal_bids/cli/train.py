"""``cahal-train``: prepare ground truth, train the tissue segmenter, train expert zoos.

Subcommands:

* ``prepare``: denoise, resample to 1 mm, label and cache high-resolution images;
* ``segmenter``: train the frozen tissue segmenter used by the semantic loss;
* ``fit``: train a zoo of 18 experts along the curriculum (resumable);
* ``merge``: combine zoos trained a few cells at a time into one;
* ``card``: regenerate a zoo's model card from its manifest and measurements.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cahal_bids.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, make_parser, report_error
from cahal_bids.core.modalities import MODALITIES

PROG = 'cahal-train'


def _add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cache-dir',
        '--cache_dir',
        type=Path,
        required=True,
        help='folder written by `cahal-train prepare`',
    )
    parser.add_argument('--out', type=Path, required=True, help='zoo folder to write')
    parser.add_argument(
        '-w',
        '--work-dir',
        '--work_dir',
        type=Path,
        required=True,
        help='run folders (checkpoints, loss logs); rerun to resume',
    )
    parser.add_argument('--modality', choices=MODALITIES, default='T1w')
    parser.add_argument(
        '--init-zoo',
        '--init_zoo',
        type=Path,
        help='start every expert from this zoo (e.g. FLAIR from T1w)',
    )
    parser.add_argument(
        '--segmenter', type=Path, help='frozen tissue segmenter folder for the semantic loss'
    )
    parser.add_argument(
        '--warm-start',
        '--warm_start',
        type=Path,
        default=None,
        help='zoo whose V1A3 expert initialises the generalist (continue a generalist, '
        'or carry a T1w generalist to FLAIR)',
    )
    parser.add_argument(
        '--lr-schedule',
        '--lr_schedule',
        choices=('plateau', 'cosine'),
        default='plateau',
        help='halve the rate on plateaus of the smoothed loss, or cosine decay over the steps',
    )
    parser.add_argument('--levels', type=int, default=4)
    parser.add_argument('--filters', type=int, default=16, help='initial filters')
    parser.add_argument('--patch-size', '--patch_size', type=int, default=64)
    parser.add_argument('--batch-size', '--batch_size', type=int, default=2)
    parser.add_argument('--generalist-steps', '--generalist_steps', type=int, default=2000)
    parser.add_argument('--steps-per-expert', '--steps_per_expert', type=int, default=400)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--fine-tune-lr', '--fine_tune_lr', type=float, default=3e-4)
    parser.add_argument(
        '--fft-weight',
        '--fft_weight',
        type=float,
        default=2e-6,
        help='weight of the Fourier term (0 disables it)',
    )
    parser.add_argument(
        '--seg-weight',
        '--seg_weight',
        type=float,
        default=0.1,
        help='weight of the semantic Dice term (0 disables it)',
    )
    parser.add_argument(
        '--ground-truth-blur',
        '--ground_truth_blur',
        type=float,
        default=0.6,
        metavar='SIGMA',
        help='largest Gaussian sigma (voxels) giving half of the ground-truth crops a random '
        'effective resolution (0 disables it)',
    )
    parser.add_argument(
        '--axis-order',
        '--axis_order',
        choices=('as-acquired', 'thickest-last'),
        default='thickest-last',
        help='thickest-last (default): every pair (and, through the manifest, every inference '
        'input) has its thickest low-resolution axis last, so the experts restore one '
        'through-plane direction; as-acquired: axes as they come, every orientation drawn in '
        'training (zoos before 0.4)',
    )
    parser.add_argument(
        '--contrasts',
        nargs='+',
        choices=MODALITIES,
        default=None,
        help='ground-truth contrasts pooled for training (default: --modality alone); '
        'several make a contrast-agnostic zoo',
    )
    parser.add_argument(
        '--contrast-augmentation',
        '--contrast_augmentation',
        type=float,
        default=0.0,
        metavar='P',
        help='probability of a random monotonic or non-monotonic intensity remapping of '
        'each ground-truth crop (default: %(default)s)',
    )
    parser.add_argument(
        '--head-coverage-augmentation',
        '--head_coverage_augmentation',
        type=float,
        default=0.0,
        metavar='P',
        help='probability of skull-stripping a crop with its brain mask (default: %(default)s)',
    )
    parser.add_argument(
        '--init-from',
        '--init_from',
        choices=('curriculum', 'same-cell'),
        default='curriculum',
        help='with --init-zoo: start each expert from its curriculum parent as just trained '
        "(default) or from the --init-zoo's expert for its own cell",
    )
    parser.add_argument('--cells', nargs='+', default=None, help='cells to train (default all)')
    parser.add_argument(
        '--time-budget-per-expert',
        '--time_budget_per_expert',
        type=float,
        default=None,
        help='seconds; an expert stops training after this',
    )
    parser.add_argument(
        '--generalist-time-budget',
        '--generalist_time_budget',
        type=float,
        default=None,
        help='seconds; the generalist stops training after this',
    )
    parser.add_argument(
        '--evaluate-every',
        '--evaluate_every',
        type=int,
        default=50,
        help='steps between looks at the smoothed training loss',
    )
    parser.add_argument(
        '--plateau-patience',
        '--plateau_patience',
        type=int,
        default=8,
        help='looks without improvement before the learning rate halves',
    )
    parser.add_argument(
        '--early-stop-patience',
        '--early_stop_patience',
        type=int,
        default=20,
        help='looks without improvement before an expert stops',
    )
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    parser.add_argument(
        '--precision',
        choices=('auto', 'fp32', 'bf16'),
        default='auto',
        help='bf16: the network under bfloat16 autocast, weights, optimizer and losses '
        '(the Fourier term included) in float32; auto (default): bf16 where the hardware '
        'computes it natively (CUDA compute capability >= 8, CPUs with AVX512-BF16 or AMX), '
        'else fp32',
    )
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quiet', '-q', action='store_true')


def _add_segmenter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--cache-dir', '--cache_dir', type=Path, required=True)
    parser.add_argument('--out', type=Path, required=True, help='segmenter folder to write')
    parser.add_argument('--modality', choices=MODALITIES, default='T1w')
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--patch-size', '--patch_size', type=int, default=64)
    parser.add_argument(
        '--validation-dir',
        '--validation_dir',
        type=Path,
        default=None,
        help='prepared folder (held-out subjects) whose Dice against the proxy labels is '
        'recorded in the segmenter manifest',
    )
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--seed', type=int, default=0)


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        'zoos',
        nargs='+',
        type=Path,
        metavar='ZOO',
        help='zoo folders, in order of precedence: a cell gets the expert of the last zoo '
        'that has one',
    )
    parser.add_argument('--out', type=Path, required=True, help='zoo folder to write')
    parser.add_argument('--name', help="the merged zoo's name (default: the last zoo's)")
    parser.add_argument(
        '--zoo-version',
        '--zoo_version',
        help="the merged zoo's version (default: the last zoo's)",
    )


def build_parser() -> argparse.ArgumentParser:
    from cahal_bids.cli.train_card import add_card_arguments
    from cahal_bids.cli.train_prepare import add_prepare_arguments

    parser = make_parser(PROG, __doc__.split('\n\n', 1)[0])
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    add_prepare_arguments(
        commands.add_parser('prepare', help='denoise, resample and label high-resolution images')
    )
    _add_segmenter_arguments(
        commands.add_parser('segmenter', help='train the frozen tissue segmenter')
    )
    _add_fit_arguments(commands.add_parser('fit', help='train the experts of a zoo'))
    _add_merge_arguments(
        commands.add_parser('merge', help='combine zoos trained a few cells at a time')
    )
    add_card_arguments(
        commands.add_parser('card', help="regenerate a zoo's model card from its measurements")
    )
    return parser


def _set_threads(threads: int | None) -> None:
    import torch

    from cahal_bids.cli.enhance import default_threads

    torch.set_num_threads(threads or default_threads())
    # Tiny gradients of a zero-initialised head turn into denormal floats, which
    # slow CPU arithmetic by an order of magnitude; flush them to zero.
    torch.set_flush_denormal(True)


def _run_fit(args: argparse.Namespace) -> int:
    import logging

    from cahal_bids.core.errors import CahalError
    from cahal_bids.core.routing import CELLS
    from cahal_bids.engine.inference import resolve_device, resolve_precision
    from cahal_bids.engine.segmenter import load_segmenter
    from cahal_bids.engine.zoo import Zoo
    from cahal_bids.training.fit import TrainingInterrupted
    from cahal_bids.training.losses import CahalLoss
    from cahal_bids.training.prepared import load_training_volumes
    from cahal_bids.training.zoo_training import ZooTrainingConfig, train_zoo

    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    _set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        volumes, sources = load_training_volumes(
            args.cache_dir,
            modality=args.contrasts or args.modality,
            brain_masks=args.head_coverage_augmentation > 0,
        )
        init_zoo = Zoo.open(args.init_zoo) if args.init_zoo else None
        warm_start = Zoo.open(args.warm_start) if args.warm_start else None
        segmenter = load_segmenter(args.segmenter, device=device) if args.segmenter else None
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    cells = tuple(args.cells) if args.cells else CELLS
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        report_error(PROG, f'unknown cells {unknown}; feasible cells are {" ".join(CELLS)}')
        return EXIT_USAGE
    config = ZooTrainingConfig(
        modality=args.modality,
        levels=args.levels,
        initial_filters=args.filters,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        generalist_steps=args.generalist_steps,
        steps_per_expert=args.steps_per_expert,
        learning_rate=args.lr,
        fine_tune_learning_rate=args.fine_tune_lr,
        fft_weight=args.fft_weight,
        seg_weight=args.seg_weight if segmenter is not None else 0.0,
        seed=args.seed,
        cells=cells,
        time_budget_per_expert_s=args.time_budget_per_expert,
        generalist_time_budget_s=args.generalist_time_budget,
        evaluate_every=args.evaluate_every,
        plateau_patience=args.plateau_patience,
        early_stop_patience=args.early_stop_patience,
        lr_schedule=args.lr_schedule,
        ground_truth_blur=args.ground_truth_blur,
        precision=precision,
        axis_order=args.axis_order,
        contrasts=tuple(args.contrasts or ()),
        contrast_augmentation=args.contrast_augmentation,
        head_coverage_augmentation=args.head_coverage_augmentation,
        init_from=args.init_from,
    )
    logging.getLogger('cahal_bids.training.zoo_training').info(
        'device %s, precision %s', device, precision
    )
    if init_zoo is not None and warm_start is not None:
        report_error(PROG, '--init-zoo and --warm-start exclude each other')
        return EXIT_USAGE
    loss = CahalLoss(
        fft_weight=args.fft_weight,
        segmenter=segmenter,
        seg_weight=config.seg_weight,
    ).to(device)
    try:
        path = train_zoo(
            volumes,
            out_dir=args.out,
            work_dir=args.work_dir,
            config=config,
            loss_fn=loss,
            device=device,
            init_zoo=init_zoo,
            warm_start=warm_start,
            data_sources=sources,
            progress=not args.quiet,
        )
    except TrainingInterrupted as error:
        report_error(
            PROG,
            f'{error}; no zoo written, rerun the same command to resume from the '
            f'checkpoints in {args.work_dir}',
        )
        return EXIT_FAILURE
    print(f'{PROG}: zoo written to {path}')
    return EXIT_OK


def _run_segmenter(args: argparse.Namespace) -> int:
    import logging

    from cahal_bids.core.errors import CahalError
    from cahal_bids.engine.inference import resolve_device
    from cahal_bids.engine.segmenter import save_segmenter
    from cahal_bids.training.prepared import load_labelled_volumes
    from cahal_bids.training.segmenter import train_segmenter, validation_dice

    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    _set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        pairs, sources = load_labelled_volumes(args.cache_dir, modality=args.modality)
        held_out, held_out_sources = (
            load_labelled_volumes(args.validation_dir, modality=args.modality)
            if args.validation_dir
            else ([], [])
        )
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    model = train_segmenter(
        pairs,
        steps=args.steps,
        patch_size=args.patch_size,
        seed=args.seed,
        device=str(device),
        modality=args.modality,
    )
    validation = None
    if held_out:
        names = [str(record['entry']) for record in held_out_sources]
        validation = {
            'what': 'Dice against the proxy (Atropos) labels of held-out subjects',
            'dice': validation_dice(model, held_out, names),
        }
        for name, scores in validation['dice'].items():
            print(f'{PROG}: validation Dice {name}: {scores}')
    save_segmenter(
        model,
        args.out,
        modality=args.modality,
        provenance={'steps': args.steps, 'seed': args.seed, 'data': list(sources)},
        validation=validation,
    )
    print(f'{PROG}: segmenter written to {args.out}')
    return EXIT_OK


def _run_merge(args: argparse.Namespace) -> int:
    from cahal_bids.engine.zoo import Zoo, ZooError
    from cahal_bids.training.zoo_merge import merge_zoos

    try:
        zoos = [Zoo.open(path) for path in args.zoos]
        path = merge_zoos(zoos, args.out, name=args.name, version=args.zoo_version)
    except ZooError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    except OSError as error:
        report_error(PROG, f'{args.out}: cannot write the merged zoo ({error})')
        return EXIT_FAILURE
    merged = Zoo.open(path, verify=False)
    print(f'{PROG}: {len(merged.trained_cells)} experts written to {path}')
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage()
        return EXIT_USAGE
    if args.command == 'prepare':
        from cahal_bids.cli.train_prepare import run_prepare

        return run_prepare(args)
    if args.command == 'segmenter':
        return _run_segmenter(args)
    if args.command == 'fit':
        return _run_fit(args)
    if args.command == 'merge':
        return _run_merge(args)
    if args.command == 'card':
        from cahal_bids.cli.train_card import run_card

        return run_card(args)
    return EXIT_FAILURE  # pragma: no cover
