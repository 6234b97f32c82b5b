"""``cahal-bids``: the BIDS-App (``cahal-bids BIDS_DIR OUTPUT_DIR participant``).

``run.py``, ``python -m cahal_bids`` and the container entry point all call :func:`main`;
the argument parser and the checks of the options are in :mod:`cahal_bids.cli.parser`.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cahal_bids.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, report_error
from cahal_bids.cli.parser import (
    PROG,
    check_participant_options,
    check_paths,
    parse_args,
    template_label,
)

if TYPE_CHECKING:
    from cahal_bids.app.config import RunConfig

__all__ = [
    'RunInputs',
    'build_config',
    'collect_inputs',
    'crash_reason',
    'main',
    'run_group',
    'run_participant',
    'write_boilerplate',
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the BIDS-App on ``argv`` (default: the command line); returns the exit code."""
    args = parse_args(argv)
    # nothing is ever sent: keep Nipype's version check (a network call) off before import
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    from cahal_bids.core.errors import CahalError

    try:
        bids_dir, output_dir = check_paths(args)
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    if args.analysis_level == 'group':
        return run_group(output_dir)
    try:
        config = build_config(args, bids_dir, output_dir)
        inputs = collect_inputs(args, config)
    except (CahalError, ValueError) as error:
        report_error(PROG, str(error))
        return EXIT_USAGE
    for subject, reason in inputs.rejected:
        report_error(PROG, f'sub-{subject}: skipped: {reason}')
    if not inputs.images:
        report_error(PROG, 'no usable image left; nothing was processed')
        return EXIT_FAILURE
    if args.boilerplate_only:
        return write_boilerplate(config, inputs)
    return run_participant(config, inputs)


def build_config(args: argparse.Namespace, bids_dir: Path, output_dir: Path) -> RunConfig:
    """The run configuration from checked options (raises ``CahalError`` on a bad one)."""
    from cahal_bids.app.config import RunConfig

    work_dir = (args.work_dir or Path.cwd() / 'work').resolve()
    filters = check_participant_options(args, bids_dir, work_dir)
    nprocs = args.nprocs or _available_cpus()
    return RunConfig(
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
        consistency_projection=args.consistency_projection,
        denoise=not args.no_denoise,
        skip_registration=args.skip_registration,
        template=template_label(args),
        template_file=str(args.template_file.resolve()) if args.template_file else '',
        output_spaces=args.output_spaces,
        write_intermediate=args.write_intermediate,
        sloppy=args.sloppy,
        stop_on_first_crash=args.stop_on_first_crash,
        write_graph=args.write_graph,
        random_seed=args.random_seed,
        verbosity=args.verbose,
    )


@dataclass
class RunInputs:
    """What a participant run found and resolved before any processing."""

    images: dict[str, list[Any]]
    """The usable images (:class:`~cahal_bids.app.bids.InputImage`) of each participant."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """``(participant, reason)`` of each image whose header cannot be used."""
    zoo_ids: dict[str, str] = field(default_factory=dict)
    template_path: str | None = None
    plugin: str = 'MultiProc'
    plugin_args: dict[str, Any] = field(default_factory=dict)
    zoo_modalities: dict[str, str] = field(default_factory=dict)
    """The modality of the zoo that serves each contrast (``{'T2w': 'T1w'}``: the T1w zoo)."""
    template_brain: dict[str, str] | None = None
    """The brain-extracted template and its brain mask (``{'brain', 'mask'}``), derived
    into the work folder when processing starts (:func:`prepare_template_brain`)."""


def collect_inputs(args: argparse.Namespace, config: RunConfig) -> RunInputs:
    """Read the dataset, its images, the zoos, the template and the Nipype plugin.

    Sets ``config.zoos``; raises ``CahalError`` or ``ValueError`` on bad inputs.
    """
    from cahal_bids.app.bids import collect_images, read_layout
    from cahal_bids.app.registration import resolve_template

    layout = read_layout(
        config.bids_dir,
        validate=not args.skip_bids_validation,
        database_dir=args.bids_database_dir,
    )
    found = collect_images(
        layout,
        participant_labels=args.participant_label,
        session_labels=args.session_label,
        modalities=config.modalities,
        filters=config.bids_filters,
    )
    images, rejected = _screen_images(found)
    present = sorted({image.modality for found in images.values() for image in found})
    config.zoos, zoo_ids, zoo_modalities = _open_zoos(args.zoo, present)
    template_path = None
    # the methods text names the template; only processing needs its file
    if not (config.skip_registration or args.boilerplate_only):
        template_path = str(resolve_template(config.template, template_file=args.template_file))
    plugin, plugin_args = _plugin_settings(args, config)
    return RunInputs(images, rejected, zoo_ids, template_path, plugin, plugin_args, zoo_modalities)


def _init_workflow(config: RunConfig, inputs: RunInputs) -> Any:
    from cahal_bids.app.workflows.base import init_cahal_wf

    return init_cahal_wf(
        config,
        inputs.images,
        zoo_ids=inputs.zoo_ids,
        template_file=inputs.template_path,
        zoo_modalities=inputs.zoo_modalities,
        template_brain=inputs.template_brain,
    )


def prepare_template_brain(config: RunConfig, inputs: RunInputs) -> None:
    """Derive (once per work folder, then checked by sha256) the template's brain mask."""
    from cahal_bids.app.registration import template_brain

    if inputs.template_path is None or inputs.template_brain is not None:
        return
    # the mask is derived here, in the main process, with an ANTs registration: on one ITK
    # thread (unless the user chose otherwise) it is the same in every run, whatever the
    # plugin; with several, the metric's sums and so its edge voxels change from run to run
    os.environ.setdefault('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', '1')
    brain = template_brain(config.template, inputs.template_path, config.work_dir)
    inputs.template_brain = {'brain': str(brain.brain), 'mask': str(brain.brain_mask)}
    print(f'{PROG}: template brain mask {brain.brain_mask}')


def write_boilerplate(config: RunConfig, inputs: RunInputs) -> int:
    """``--boilerplate-only``: write the methods text of the run's workflow, run nothing."""
    from cahal_bids.app.boilerplate import write_citation

    path = write_citation(_init_workflow(config, inputs), config.output_dir)
    print(f'{PROG}: methods boilerplate written to {path}')
    return EXIT_OK


def run_participant(config: RunConfig, inputs: RunInputs) -> int:
    """Participant level: build and run the workflow, then write each participant's report."""
    from cahal_bids.app.bids import container_from_environment, write_dataset_description
    from cahal_bids.app.boilerplate import methods_text, write_citation
    from cahal_bids.app.workflows.base import subject_log_dir
    from cahal_bids.core.errors import CahalError

    work_dir, output_dir = Path(config.work_dir), Path(config.output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config_file = config.save(work_dir / f'config-{config.run_id}.toml')
    previous_config_dir = _configure_nipype(config, work_dir)
    write_dataset_description(
        output_dir, bids_dir=Path(config.bids_dir), container=container_from_environment()
    )
    try:
        prepare_template_brain(config, inputs)
    except CahalError as error:
        report_error(PROG, str(error))
        return EXIT_FAILURE
    # built after _configure_nipype: every node copies Nipype's settings when it is made
    workflow = _init_workflow(config, inputs)
    write_citation(workflow, output_dir)
    for subject in inputs.images:
        log_dir = subject_log_dir(output_dir, subject, config.run_id)
        log_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_file, log_dir / 'cahal-bids.toml')
    if config.write_graph:
        _write_graph(workflow)
    total = sum(len(found) for found in inputs.images.values())
    print(
        f'{PROG}: {total} image(s) of {len(inputs.images)} participant(s); work folder '
        f'{work_dir}; run {config.run_id}',
        file=sys.stderr,
    )
    crashed_run = None
    try:
        workflow.run(plugin=inputs.plugin, plugin_args=inputs.plugin_args)
    except RuntimeError as error:  # Nipype: some nodes failed, the others finished
        crashed_run = error
    finally:
        if previous_config_dir is None:
            os.environ.pop('NIPYPE_CONFIG_DIR', None)
        else:
            os.environ['NIPYPE_CONFIG_DIR'] = previous_config_dir
    failures = _write_subject_reports(config, inputs, methods_text(workflow))
    _print_consistency_warnings(output_dir, list(inputs.images))
    if crashed_run is not None and not failures:
        report_error(PROG, f'the workflow failed: {crashed_run}')
        return EXIT_FAILURE
    if failures or inputs.rejected:
        _print_failures(inputs.rejected, failures)
        return EXIT_FAILURE
    print(f'{PROG}: done; derivatives in {output_dir}')
    return EXIT_OK


def _write_subject_reports(
    config: RunConfig, inputs: RunInputs, methods: str
) -> dict[str, list[Path]]:
    """Write ``sub-<label>.html`` for every participant; returns their crash files."""
    from cahal_bids.app.reports import write_subject_report
    from cahal_bids.app.workflows.base import subject_log_dir

    failures: dict[str, list[Path]] = {}
    for subject in inputs.images:
        crashes = _crash_files(subject_log_dir(config.output_dir, subject, config.run_id))
        if crashes:
            failures[subject] = crashes
        report = write_subject_report(
            config.output_dir,
            subject,
            crash_files=crashes,
            boilerplate=methods,
            run_info={
                'cahal-bids': config.version,
                'run': config.run_id,
                'dataset': config.bids_dir,
                'template': 'none (--skip-registration)'
                if config.skip_registration
                else config.template,
                'denoising': config.denoise,
            },
        )
        print(f'{PROG}: report {report}')
    return failures


def _print_consistency_warnings(output_dir: Path, subjects: Sequence[str] | None) -> int:
    """One WARNING line per image the consistency guard flagged; returns their number."""
    from cahal_bids.app.group import consistency_warnings

    flagged = consistency_warnings(output_dir, subjects)
    for image, record in flagged:
        print(
            f'{PROG}: WARNING: {image}: the restored image agrees less with the acquired data '
            f'than trilinear interpolation (re-acquisition RMSE {record.get("rmse_expert")} '
            f'against {record.get("rmse_trilinear")}); check it',
            file=sys.stderr,
        )
    if flagged:
        print(
            f'{PROG}: {len(flagged)} image(s) flagged by the consistency guard (see the reports)',
            file=sys.stderr,
        )
    return len(flagged)


def _print_failures(rejected: Sequence[tuple[str, str]], failures: dict[str, list[Path]]) -> None:
    print(f'{PROG}: failures:', file=sys.stderr)
    for subject, reason in rejected:
        print(f'  sub-{subject}: {reason}', file=sys.stderr)
    for subject, crashes in failures.items():
        for crash in crashes:
            print(f'  sub-{subject}: {crash_reason(crash)}', file=sys.stderr)
            print(f'    crash file: {crash}', file=sys.stderr)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _open_zoos(paths: Sequence[Path], routes: Sequence[str]) -> tuple[dict, dict, dict]:
    """Zoo folder, cache identifier and modality per route (image contrast), from --zoo
    or the shipped zoos.

    Each ``--zoo`` serves the contrast its manifest names. A route takes the given zoo of
    its own contrast, else a given zoo that the route table lends it (a T1w zoo serves
    FLAIR images while the table sends FLAIR to the T1w zoo,
    :func:`~cahal_bids.engine.zoo.serving_modalities`), else the shipped zoo that the route
    table names.
    """
    from cahal_bids.engine.zoo import Zoo, ZooError, default_zoo_path, serving_modalities

    given: dict[str, Zoo] = {}
    for path in paths:
        zoo = Zoo.open(Path(path).resolve())
        if zoo.modality in given:
            raise ZooError(f'{path}: a second --zoo for {zoo.modality}')
        given[zoo.modality] = zoo
    shipped: dict[Path, Zoo] = {}
    zoos: dict[str, str] = {}
    ids: dict[str, str] = {}
    modalities: dict[str, str] = {}
    for route in routes:
        candidates = [given[m] for m in serving_modalities(route) if m in given]
        if candidates:
            zoo = candidates[0]
        else:
            folder = default_zoo_path(route)
            if folder not in shipped:  # routes that share a zoo: check its weights once
                shipped[folder] = Zoo.open(folder)
            zoo = shipped[folder]
        zoo.check_serves(route)
        zoos[route] = str(zoo.path)
        ids[route] = f'{zoo.name} {zoo.version} {zoo.manifest_sha256[:16]}'
        modalities[route] = zoo.modality
    return zoos, ids, modalities


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


def _screen_images(images: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Drop images that cannot be restored, with a one-line reason for each.

    An image whose contrast (the BIDS suffix of its file, which a ``--bids-filter-file``
    entry may have chosen) has no route, or whose header cannot be used.
    """
    from cahal_bids.core.errors import CahalError
    from cahal_bids.core.nifti import load_header
    from cahal_bids.engine.zoo import ROUTED_MODALITIES

    kept: dict = {}
    rejected: list[tuple[str, str]] = []
    for subject, found in images.items():
        for image in found:
            if image.suffix not in ROUTED_MODALITIES:
                rejected.append((subject, (
                    f'{image.path}: its contrast {image.suffix} has no route (no zoo restores '
                    f'it; cahal-bids restores {", ".join(ROUTED_MODALITIES)} images)'
                )))  # fmt: skip
                continue
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
    _print_consistency_warnings(output_dir, None)
    print(f'{PROG}: {len(rows)} image(s) summarised in {table} and {page}')
    return EXIT_OK


def _write_graph(workflow) -> None:
    try:
        workflow.write_graph(graph2use='colored', format='svg', simple_form=True)
    except Exception as error:  # graphviz missing or failing: the dot file is still there
        print(f'{PROG}: warning: could not render the workflow graph ({error})', file=sys.stderr)
