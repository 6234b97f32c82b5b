"""Train a whole expert zoo: generalist start, curriculum across the grid, manifest out.

:func:`train_zoo` is what ``cahal-train fit`` runs. Each expert trains in its own
run folder under ``work_dir`` (checkpoints, loss log), so an interrupted zoo run
resumes where it stopped: finished experts are not trained again, the expert in
progress resumes from its last checkpoint. SIGINT or SIGTERM stops the whole run
(:class:`~cahal_bids.training.fit.TrainingInterrupted`) once the fit in progress has
checkpointed, so no expert ever starts from an unfinished parent.

Initialisation follows the curriculum: a generalist trained on pairs from every
cell (or, for a fine-tuned zoo such as FLAIR from T1w, the matching expert of
``init_zoo``) starts V1A3, and every other cell starts from its curriculum parent.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cahal_bids import __version__
from cahal_bids.core.axis_order import AXIS_ORDERS
from cahal_bids.core.normalization import DEFAULT_NORMALIZATION
from cahal_bids.core.routing import CELLS
from cahal_bids.engine.networks import ResidualUNet3D, count_parameters
from cahal_bids.engine.patch_statistics import PATCH_MEAN_DEFAULTS
from cahal_bids.engine.zoo import Zoo, write_zoo
from cahal_bids.physics.acquisition import CellSampler
from cahal_bids.training.fit import (
    AnyCellSampler,
    FitResult,
    TrainingInterrupted,
    TrainingSchedule,
    curriculum_order,
    fit,
    parent_cell,
)
from cahal_bids.training.pairs import (
    ContrastAugmentation,
    GroundTruthBlur,
    HeadCoverageAugmentation,
    IntensityAugmentation,
    PairStream,
    TrainingVolume,
)

__all__ = ['TRAINING_PRECISIONS', 'ZooTrainingConfig', 'train_zoo']

TRAINING_PRECISIONS = ('fp32', 'bf16')
INIT_FROM = ('curriculum', 'same-cell')

LOGGER = logging.getLogger('cahal_bids.training.zoo_training')


@dataclass(frozen=True)
class ZooTrainingConfig:
    """Everything that shapes a trained zoo (recorded in its manifest)."""

    modality: str = 'T1w'
    levels: int = 4
    initial_filters: int = 16
    patch_size: int = 64
    batch_size: int = 2
    generalist_steps: int = 2000
    steps_per_expert: int = 400
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 3e-4
    fft_weight: float = 2e-6
    seg_weight: float = 0.1
    seed: int = 0
    cells: tuple[str, ...] = CELLS
    time_budget_per_expert_s: float | None = None
    generalist_time_budget_s: float | None = None
    evaluate_every: int = 50
    plateau_patience: int = 8
    early_stop_patience: int = 20
    lr_schedule: str = 'plateau'
    ground_truth_blur: float = 0.6
    """Largest sigma (voxels) of :class:`~cahal_bids.training.pairs.GroundTruthBlur`; 0: none."""
    precision: str = 'fp32'
    """``'fp32'``, or ``'bf16'``: the network under bfloat16 autocast, weights, optimizer
    and losses in float32 (``cahal-train fit --precision auto`` picks bf16 where the
    hardware computes it natively)."""

    contrasts: tuple[str, ...] = ()
    """Ground-truth contrasts pooled for training; empty: ``modality`` alone."""
    contrast_augmentation: float = 0.0
    """Probability of :class:`~cahal_bids.training.pairs.ContrastAugmentation`; 0: none."""
    head_coverage_augmentation: float = 0.0
    """Probability of :class:`~cahal_bids.training.pairs.HeadCoverageAugmentation`; 0: none."""
    init_from: str = 'curriculum'
    """With an ``init_zoo``: ``'curriculum'`` starts every expert but the first from its
    curriculum parent as just trained; ``'same-cell'`` starts each from the
    ``init_zoo``'s expert for its own cell (fine-tuning a trained zoo)."""

    axis_order: str = 'thickest-last'
    """``'thickest-last'``: pairs (and, through the manifest, inference) put the thickest
    low-resolution axis last (:mod:`cahal_bids.core.axis_order`); ``'as-acquired'``: every
    orientation is drawn and inference keeps the volume's own axis order."""

    def __post_init__(self) -> None:
        if self.axis_order not in AXIS_ORDERS:
            raise ValueError(f'axis_order must be one of {AXIS_ORDERS}, got {self.axis_order!r}')
        if self.init_from not in INIT_FROM:
            raise ValueError(f'init_from must be one of {INIT_FROM}, got {self.init_from!r}')
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(
                f'precision must be one of {TRAINING_PRECISIONS}, got {self.precision!r}'
            )

    def architecture(self) -> dict[str, Any]:
        return {
            'name': 'ResidualUNet3D',
            'config': ResidualUNet3D(
                levels=self.levels, initial_filters=self.initial_filters
            ).config(),
        }


def _precision_record(result: FitResult) -> str | dict[str, int]:
    """``'bf16'`` when every step ran in one precision, else the steps in each."""
    counts = result.steps_by_precision
    return next(iter(counts)) if len(counts) == 1 else dict(sorted(counts.items()))


def _state_of(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}


def _fit_one(
    *,
    name: str,
    network: ResidualUNet3D,
    volumes: Sequence[TrainingVolume],
    sampler: Any,
    loss_fn: Any,
    config: ZooTrainingConfig,
    steps: int,
    learning_rate: float,
    seed: int,
    work_dir: Path,
    device: torch.device,
    progress: bool,
    time_budget_s: float | None,
) -> FitResult:
    stream = PairStream(
        volumes,
        sampler,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        augmentation=IntensityAugmentation(),
        contrast=(
            ContrastAugmentation(probability=config.contrast_augmentation)
            if config.contrast_augmentation > 0
            else None
        ),
        head_coverage=(
            HeadCoverageAugmentation(probability=config.head_coverage_augmentation)
            if config.head_coverage_augmentation > 0
            else None
        ),
        blur=GroundTruthBlur(config.ground_truth_blur) if config.ground_truth_blur > 0 else None,
        thickest_last=config.axis_order == 'thickest-last',
        seed=seed,
    )
    schedule = TrainingSchedule(
        max_steps=steps,
        learning_rate=learning_rate,
        time_budget_s=time_budget_s,
        evaluate_every=config.evaluate_every,
        plateau_patience=config.plateau_patience,
        early_stop_patience=config.early_stop_patience,
        lr_schedule=config.lr_schedule,
    )
    result = fit(
        network,
        stream,
        loss_fn,
        run_dir=work_dir / name,
        schedule=schedule,
        device=device,
        mixed_precision=config.precision == 'bf16',
        progress=progress,
        metadata={'name': name},
    )
    if result.interrupted:
        raise TrainingInterrupted(result.run_dir, result.steps)
    return result


def train_zoo(
    volumes: Sequence[TrainingVolume],
    *,
    out_dir: str | Path,
    work_dir: str | Path,
    config: ZooTrainingConfig,
    loss_fn: Any,
    device: torch.device,
    init_zoo: Zoo | None = None,
    warm_start: Zoo | None = None,
    name: str | None = None,
    version: str = __version__,
    data_sources: Sequence[Mapping[str, Any]] = (),
    progress: bool = True,
    extra_manifest: Mapping[str, Any] | None = None,
) -> Path:
    """Train every cell of ``config.cells`` in curriculum order and write the zoo.

    ``init_zoo`` skips the generalist and starts each expert from that zoo's choice for
    its cell. ``warm_start`` instead starts the generalist from that zoo's V1A3 expert
    (for a generalist-only zoo, the generalist itself; for FLAIR, a T1w generalist), so
    a generalist can be continued under a new schedule or carried to another modality.

    Raises
    ------
    TrainingInterrupted
        SIGINT or SIGTERM arrived: the fit in progress checkpointed and stopped, no
        later expert was started and no zoo was written. Calling again with the same
        ``work_dir`` resumes.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / 'config.json').write_text(json.dumps(asdict(config), indent=2) + '\n')
    trained: dict[str, dict[str, torch.Tensor]] = {}
    provenance: dict[str, dict[str, Any]] = {}

    def fresh() -> ResidualUNet3D:
        torch.manual_seed(config.seed)
        return ResidualUNet3D(levels=config.levels, initial_filters=config.initial_filters)

    generalist: dict[str, torch.Tensor] | None = None
    generalist_seconds = 0.0
    if init_zoo is not None and warm_start is not None:
        raise ValueError('give init_zoo or warm_start, not both')
    if init_zoo is None:
        network = fresh()
        if warm_start is not None:
            network.load_state_dict(warm_start.load_state_dict(warm_start.choose('V1A3').cell))
        result = _fit_one(
            name='generalist',
            network=network,
            volumes=volumes,
            sampler=AnyCellSampler(tuple(config.cells)),
            loss_fn=loss_fn,
            config=config,
            steps=config.generalist_steps,
            learning_rate=config.learning_rate,
            seed=config.seed,
            work_dir=work,
            device=device,
            progress=progress,
            time_budget_s=config.generalist_time_budget_s,
        )
        generalist = _state_of(network)
        generalist_seconds = result.seconds
        LOGGER.info('generalist: %d steps, loss %.4f', result.steps, result.smoothed_loss)

    for index, cell in enumerate(curriculum_order(list(config.cells))):
        parent = parent_cell(cell)
        network = fresh()
        if init_zoo is not None and config.init_from == 'same-cell':
            choice = init_zoo.choose(cell)
            network.load_state_dict(init_zoo.load_state_dict(choice.cell))
            initialised_from = f'{init_zoo.name} {init_zoo.version} expert {choice.cell}'
        elif parent is not None and parent in trained:
            network.load_state_dict(trained[parent])
            initialised_from = f'expert {parent} (curriculum parent)'
        elif init_zoo is not None:
            choice = init_zoo.choose(cell)
            network.load_state_dict(init_zoo.load_state_dict(choice.cell))
            initialised_from = f'{init_zoo.name} {init_zoo.version} expert {choice.cell}'
        else:
            assert generalist is not None
            network.load_state_dict(generalist)
            initialised_from = 'generalist trained on every cell'
        result = _fit_one(
            name=cell,
            network=network,
            volumes=volumes,
            sampler=CellSampler(cell),
            loss_fn=loss_fn,
            config=config,
            steps=config.steps_per_expert,
            learning_rate=config.fine_tune_learning_rate,
            seed=config.seed + 1 + index,
            work_dir=work,
            device=device,
            progress=progress,
            time_budget_s=config.time_budget_per_expert_s,
        )
        trained[cell] = _state_of(network)
        provenance[cell] = {
            'initialised_from': initialised_from,
            'steps': result.steps,
            'seconds': round(result.seconds, 1),
            'smoothed_training_loss': result.smoothed_loss,
            'stopped_early': result.stopped_early,
            'seed': config.seed + 1 + index,
            'precision': _precision_record(result),
        }
        LOGGER.info('%s: %d steps, loss %.4f', cell, result.steps, result.smoothed_loss)

    architecture = config.architecture()
    parameters = count_parameters(ResidualUNet3D.from_config(architecture['config']))
    return write_zoo(
        out_dir,
        name=name or f'cahal-{config.modality.lower()}',
        version=version,
        modality=config.modality,
        architecture=architecture,
        normalization=DEFAULT_NORMALIZATION,
        experts=trained,
        provenance=provenance,
        storage_dtype='float16',
        norm_statistics={**PATCH_MEAN_DEFAULTS, 'patch_size': config.patch_size},
        axis_order=None if config.axis_order == 'as-acquired' else config.axis_order,
        extra={
            'training': {
                **asdict(config),
                'parameters_per_expert': parameters,
                'training_seconds': round(
                    generalist_seconds + sum(entry['seconds'] for entry in provenance.values()), 1
                ),
                'device': str(device),
                'hardware': platform.processor() or platform.machine(),
                'torch_threads': torch.get_num_threads(),
                'init_zoo': None if init_zoo is None else f'{init_zoo.name} {init_zoo.version}',
                'warm_start': (
                    None if warm_start is None else f'{warm_start.name} {warm_start.version}'
                ),
                'data': list(data_sources),
                'software': {'cahal-bids': __version__, 'torch': torch.__version__},
            },
            **dict(extra_manifest or {}),
        },
    )
