"""``cahal-bids``: the BIDS-App (``cahal-bids BIDS_DIR OUTPUT_DIR participant``).

``run.py``, ``python -m cahal_bids`` and the container entry point all call :func:`main`.
Exit codes: 0 everything done; 1 at least one image failed (all others were still
processed; the failures and their crash files are listed); 2 usage or input errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from cahal_bids.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    make_parser,
    positive_int,
    report_error,
)

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
    parser = make_parser(
        PROG,
        'Restore the low-resolution T1w and FLAIR images of a BIDS dataset to 1 mm in native '
        'space with CAHAL, register them to a template, and write BIDS derivatives.',
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
        help='JSON of PyBIDS filters per query ("t1w", "flair") that refine the selection',
    )
    select.add_argument(
        '--modalities',
        nargs='+',
        choices=['T1w', 'FLAIR'],
        default=['T1w', 'FLAIR'],
        help='which images to enhance (default both)',
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
        help='expert zoo folder(s); each manifest names its modality (default: shipped zoos)',
    )
    processing.add_argument(
        *_both_spellings('no-denoise'),
        dest='no_denoise',
        action='store_true',
        help='skip the non-local means denoising before enhancement',
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


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _open_zoos(paths: Sequence[Path], modalities: Sequence[str]) -> tuple[dict, dict]:
    """Zoo folder and cache identifier per modality, from --zoo or the shipped zoos."""
    import hashlib

    from cahal_bids.engine.zoo import MANIFEST_NAME, Zoo, ZooError, default_zoo_path

    folders: dict[str, Path] = {}
    for path in paths:
        zoo = Zoo.open(path)
        if zoo.modality in folders:
            raise ZooError(f'{path}: a second --zoo for {zoo.modality}')
        folders[zoo.modality] = Path(path).resolve()
    zoos: dict[str, str] = {}
    ids: dict[str, str] = {}
    for modality in modalities:
        folder = folders.get(modality) or default_zoo_path(modality)
        zoo = Zoo.open(folder)
        digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()[:16]
        zoos[modality] = str(folder)
        ids[modality] = f'{zoo.name} {zoo.version} {digest}'
    return zoos, ids


def _plugin_settings(args: argparse.Namespace, config) -> tuple[str, dict]:
    if args.use_plugin is not None:
        import yaml

        try:
            settings = yaml.safe_load(args.use_plugin.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f'{args.use_plugin}: unreadable plugin file ({error})') from None
        if not isinstance(settings, dict) or 'plugin' not in settings:
            raise ValueError(f'{args.use_plugin}: expected a YAML mapping with a "plugin" key')
        return str(settings['plugin']), dict(settings.get('plugin_args') or {})
    # forkserver: forking a process that already runs threads (torch, ITK) can deadlock
    plugin_args = {
        'n_procs': config.nprocs,
        'raise_insufficient': False,
        'mp_context': 'forkserver',
    }
    if config.mem_gb:
        plugin_args['memory_gb'] = config.mem_gb
    return 'MultiProc', plugin_args


def _configure_nipype(config, work_dir: Path) -> str | None:
    """Configure Nipype for this run; returns the previous ``NIPYPE_CONFIG_DIR``."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    from cahal_bids.core.atomic import write_text_atomic

    settings = {
        'execution': {
            'crashfile_format': 'txt',
            'stop_on_first_crash': config.stop_on_first_crash,
            'hash_method': 'content',
            'remove_unnecessary_outputs': False,
            'check_version': False,
            'poll_sleep_duration': 0.5,
            'create_report': True,
        },
        'logging': {
            'workflow_level': ('WARNING', 'INFO', 'DEBUG')[min(config.verbosity, 2)],
            'interface_level': ('WARNING', 'WARNING', 'INFO')[min(config.verbosity, 2)],
            'log_directory': str(work_dir),
            'log_to_file': True,
        },
    }
    nipype_config.update_config(settings)
    nipype_logging.update_logging(nipype_config)
    # MultiProc's worker processes read Nipype's configuration afresh from
    # NIPYPE_CONFIG_DIR: give them the same settings (log levels included)
    folder = work_dir / 'nipype-config'
    lines = []
    for section, values in settings.items():
        lines.append(f'[{section}]')
        lines += [f'{key} = {str(value).lower() if isinstance(value, bool) else value}'
                  for key, value in values.items()]  # fmt: skip
    write_text_atomic(folder / 'nipype.cfg', '\n'.join(lines) + '\n')
    previous = os.environ.get('NIPYPE_CONFIG_DIR')
    os.environ['NIPYPE_CONFIG_DIR'] = str(folder)
    return previous


def _crash_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob('crash-*')) if log_dir.is_dir() else []


_EXCEPTION_LINE = re.compile(r'^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$')


def crash_reason(crash_file: Path) -> str:
    """The node and the innermost exception message of a Nipype crash file, on one line."""
    try:
        lines = crash_file.read_text(errors='replace').splitlines()
    except OSError as error:
        return f'unreadable crash file ({error})'
    node = next((line[len('Node: ') :] for line in lines if line.startswith('Node: ')), '?')
    messages = [
        match.group(2) for match in map(_EXCEPTION_LINE.match, lines)
        if match and 'NodeExecutionError' not in match.group(1)
    ]  # fmt: skip
    return f'{node.split(".")[-2] if "." in node else node}: {messages[-1] if messages else "?"}'


def _screen_headers(images: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Drop images whose header cannot be used, with a one-line reason for each."""
    from cahal_bids.core.errors import CahalError
    from cahal_bids.core.nifti import load_header

    kept: dict = {}
    rejected: list[tuple[str, str]] = []
    for subject, found in images.items():
        for image in found:
            try:
                load_header(image.path)
            except CahalError as error:
                rejected.append((subject, ' '.join(str(error).split())))
            else:
                kept.setdefault(subject, []).append(image)
    return kept, rejected


def run_group(output_dir: Path) -> int:
    """Group level: ``group_summary.tsv`` and ``group.html`` from the participant outputs."""
    from cahal_bids.app.group import collect_group_rows, write_group_summary
    from cahal_bids.app.reports import write_group_report

    if not output_dir.is_dir():
        report_error(PROG, f'{output_dir}: no participant-level outputs to summarise')
        return EXIT_USAGE
    rows = collect_group_rows(output_dir)
    if not rows:
        report_error(PROG, f'{output_dir}: no enhanced image found; run participant level first')
        return EXIT_USAGE
    table = write_group_summary(output_dir, rows)
    page = write_group_report(output_dir, rows)
    print(f'{PROG}: {len(rows)} image(s) summarised in {table} and {page}')
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:  # noqa: C901 - a linear recipe
    args = build_parser().parse_args(argv)
    # nothing is ever sent: keep Nipype's version check (a network call) off before import
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    from cahal_bids.app.bids import (
        BIDSInputError,
        check_output_dir,
        collect_images,
        container_from_environment,
        load_bids_filters,
        read_layout,
        write_dataset_description,
    )
    from cahal_bids.core.errors import CahalError

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    try:
        if not bids_dir.is_dir():
            raise BIDSInputError(f'{args.bids_dir}: the BIDS dataset folder does not exist')
        check_output_dir(bids_dir, output_dir)
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    if args.analysis_level == 'group':
        return run_group(output_dir)

    from cahal_bids.app.boilerplate import boilerplate
    from cahal_bids.app.config import RunConfig

    work_dir = (args.work_dir or Path.cwd() / 'work').resolve()
    nprocs = args.nprocs or _available_cpus()
    template = args.template
    if args.template_file is not None:
        template = (
            args.template_name
            or re.sub(r'[^A-Za-z0-9]', '', args.template_file.name.split('.')[0])
            or 'custom'
        )
    try:
        for folder, what in ((work_dir, 'work'), (args.bids_database_dir, 'BIDS database')):
            if folder is not None and (
                folder.resolve() == bids_dir or bids_dir in folder.resolve().parents
            ):
                raise BIDSInputError(f'{folder}: the {what} folder must be outside the dataset')
        filters = load_bids_filters(args.bids_filter_file)
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    config = RunConfig(
        bids_dir=str(bids_dir),
        output_dir=str(output_dir),
        analysis_level=args.analysis_level,
        work_dir=str(work_dir),
        participant_label=list(args.participant_label or []),
        session_label=list(args.session_label or []),
        modalities=list(dict.fromkeys(args.modalities)),
        bids_filters=filters,
        skip_bids_validation=args.skip_bids_validation,
        bids_database_dir=str(args.bids_database_dir.resolve()) if args.bids_database_dir else '',
        nprocs=nprocs,
        omp_nthreads=args.omp_nthreads or max(1, min(nprocs - 1, 8)),
        mem_gb=args.mem_gb or 0.0,
        plugin_file=str(args.use_plugin.resolve()) if args.use_plugin else '',
        device=args.device,
        precision=args.precision,
        denoise=not args.no_denoise,
        skip_registration=args.skip_registration,
        template=template,
        template_file=str(args.template_file.resolve()) if args.template_file else '',
        output_spaces=args.output_spaces,
        write_intermediate=args.write_intermediate,
        sloppy=args.sloppy,
        stop_on_first_crash=args.stop_on_first_crash,
        write_graph=args.write_graph,
        random_seed=args.random_seed,
        verbosity=args.verbose,
    )
    methods = boilerplate(config)
    if args.boilerplate_only:
        from cahal_bids.core.atomic import write_text_atomic

        path = write_text_atomic(output_dir / 'logs' / 'CITATION.md', methods)
        print(f'{PROG}: methods boilerplate written to {path}')
        return EXIT_OK

    from cahal_bids.app.registration import resolve_template

    try:
        layout = read_layout(
            bids_dir,
            validate=not args.skip_bids_validation,
            database_dir=args.bids_database_dir,
        )
        images = collect_images(
            layout,
            participant_labels=args.participant_label,
            session_labels=args.session_label,
            modalities=config.modalities,
            filters=filters,
        )
        images, rejected = _screen_headers(images)
        present = sorted({image.modality for found in images.values() for image in found})
        config.zoos, zoo_ids = _open_zoos(args.zoo, present)
        template_path = None
        if not config.skip_registration:
            template_path = str(
                resolve_template(config.template, template_file=args.template_file)
            )
        plugin, plugin_args = _plugin_settings(args, config)
    except (CahalError, ValueError) as error:
        report_error(PROG, str(error))
        return EXIT_USAGE

    from cahal_bids.app.workflows.base import init_cahal_wf, subject_log_dir

    for subject, reason in rejected:
        report_error(PROG, f'sub-{subject}: skipped: {reason}')
    if not images:
        report_error(PROG, 'no usable image left; nothing was processed')
        return EXIT_FAILURE
    work_dir.mkdir(parents=True, exist_ok=True)
    config_file = config.save(work_dir / f'config-{config.run_id}.toml')
    previous_config_dir = _configure_nipype(config, work_dir)
    write_dataset_description(
        output_dir, bids_dir=bids_dir, container=container_from_environment()
    )
    from cahal_bids.core.atomic import write_text_atomic

    write_text_atomic(output_dir / 'logs' / 'CITATION.md', methods)
    for subject in images:
        log_dir = subject_log_dir(output_dir, subject, config.run_id)
        log_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_file, log_dir / 'cahal-bids.toml')
    workflow = init_cahal_wf(config, images, zoo_ids=zoo_ids, template_file=template_path)
    if config.write_graph:
        _write_graph(workflow)
    total = sum(len(found) for found in images.values())
    print(
        f'{PROG}: {total} image(s) of {len(images)} participant(s); work folder {work_dir}; '
        f'run {config.run_id}',
        file=sys.stderr,
    )
    crashed_run = None
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as error:  # Nipype: some nodes failed, the others finished
        crashed_run = error
    finally:
        if previous_config_dir is None:
            os.environ.pop('NIPYPE_CONFIG_DIR', None)
        else:
            os.environ['NIPYPE_CONFIG_DIR'] = previous_config_dir
    from cahal_bids.app.reports import write_subject_report

    failures: dict[str, list[Path]] = {}
    for subject in images:
        crashes = _crash_files(subject_log_dir(output_dir, subject, config.run_id))
        if crashes:
            failures[subject] = crashes
        report = write_subject_report(
            output_dir,
            subject,
            crash_files=crashes,
            boilerplate=methods,
            run_info={
                'cahal-bids': config.version,
                'run': config.run_id,
                'dataset': str(bids_dir),
                'template': 'none (--skip-registration)'
                if config.skip_registration
                else config.template,
                'denoising': config.denoise,
            },
        )
        print(f'{PROG}: report {report}')
    if crashed_run is not None and not failures:
        report_error(PROG, f'the workflow failed: {crashed_run}')
        return EXIT_FAILURE
    if failures or rejected:
        print(f'{PROG}: failures:', file=sys.stderr)
        for subject, reason in rejected:
            print(f'  sub-{subject}: {reason}', file=sys.stderr)
        for subject, crashes in failures.items():
            for crash in crashes:
                print(f'  sub-{subject}: {crash_reason(crash)}', file=sys.stderr)
                print(f'    crash file: {crash}', file=sys.stderr)
        return EXIT_FAILURE
    print(f'{PROG}: done; derivatives in {output_dir}')
    return EXIT_OK


def _write_graph(workflow) -> None:
    try:
        workflow.write_graph(graph2use='colored', format='svg', simple_form=True)
    except Exception as error:  # graphviz missing or failing: the dot file is still there
        print(f'{PROG}: warning: could not render the workflow graph ({error})', file=sys.stderr)
