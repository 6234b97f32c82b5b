"""Training experts: the optimisation loop, exact checkpoints, and the grid curriculum.

:func:`fit` trains one network on a :class:`~cahal_bids.training.pairs.PairStream` with Adam,
reduce-on-plateau and early stopping, both driven by a smoothed training loss (the
stream is endless, so the training loss is an honest proxy). It writes a CSV loss
log and checkpoints every few minutes; a run interrupted at any moment resumes from
its last checkpoint with the same model, optimiser, scheduler and random state;
SIGINT or SIGTERM stops it cleanly at the next step with a final checkpoint, and
its :class:`FitResult` says so (``interrupted``) so that callers running several
fits in a row can stop too (:class:`TrainingInterrupted`).

Checkpoints never use pickle: tensors (model, optimiser moments, torch RNG) go to a
safetensors file, everything else to JSON that records the tensor file's sha256.

The curriculum (:func:`parent_cell`, :func:`curriculum_order`) starts from V1A3 and
passes weights along volume at fixed near-isotropic anisotropy, and from
near-isotropic to strongly anisotropic cells at fixed volume.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cahal_bids.core.atomic import write_bytes_atomic
from cahal_bids.core.errors import CahalError
from cahal_bids.core.routing import CELLS, cell_name
from cahal_bids.physics.acquisition import sample_in_cell

__all__ = [
    'AnyCellSampler',
    'FitResult',
    'TrainingInterrupted',
    'TrainingSchedule',
    'curriculum_order',
    'fit',
    'parent_cell',
]

LOGGER = logging.getLogger('cahal_bids.training.fit')
CHECKPOINT_TENSORS = 'checkpoint.safetensors'
CHECKPOINT_STATE = 'checkpoint.json'
LOSS_LOG = 'loss.csv'


def parent_cell(cell: str) -> str | None:
    """The cell whose expert initialises ``cell`` in the curriculum (None for V1A3).

    >>> [parent_cell(c) for c in ('V1A3', 'V2A3', 'V2A2', 'V3A1', 'V7A1')]
    [None, 'V1A3', 'V2A3', 'V3A2', 'V7A2']
    """
    if cell not in CELLS:
        raise ValueError(f'unknown cell {cell!r}')
    volume, anisotropy = int(cell[1]), int(cell[3])
    if anisotropy < 3 and cell_name(volume, anisotropy + 1) in CELLS:
        return cell_name(volume, anisotropy + 1)
    if volume > 1:
        return cell_name(volume - 1, anisotropy)
    return None


def curriculum_order(cells: tuple[str, ...] | list[str] = CELLS) -> list[str]:
    """``cells`` ordered so that every cell comes after its curriculum parent."""
    wanted = set(cells)
    unknown = wanted - set(CELLS)
    if unknown:
        raise ValueError(f'unknown cells {sorted(unknown)}')

    def depth(cell: str) -> int:
        steps, current = 0, parent_cell(cell)
        while current is not None:
            steps, current = steps + 1, parent_cell(current)
        return steps

    return sorted(wanted, key=lambda cell: (depth(cell), CELLS.index(cell)))


@dataclass(frozen=True)
class AnyCellSampler:
    """Draw a cell uniformly among ``cells``, then a triplet uniformly inside it."""

    cells: tuple[str, ...] = CELLS

    def __call__(self, rng: np.random.Generator) -> tuple[float, float, float]:
        cell = self.cells[int(rng.integers(len(self.cells)))]
        return sample_in_cell(cell, rng)


@dataclass(frozen=True)
class TrainingSchedule:
    """Optimisation settings of one :func:`fit` run."""

    max_steps: int = 1000
    learning_rate: float = 1e-3
    evaluate_every: int = 50
    """Steps between two looks at the smoothed loss (plateau and early stopping)."""
    plateau_patience: int = 8
    """Looks without improvement before the learning rate is halved."""
    early_stop_patience: int = 20
    """Looks without improvement before training stops."""
    min_learning_rate: float = 1e-6
    smoothing: float = 0.99
    """Exponential moving average factor of the logged training loss."""
    checkpoint_every_s: float = 300.0
    time_budget_s: float | None = None
    gradient_clip: float | None = 1.0
    lr_schedule: str = 'plateau'
    """``'plateau'`` halves the rate when the smoothed loss stalls; ``'cosine'`` decays it
    from ``learning_rate`` to ``min_learning_rate`` over ``max_steps`` (robust when the
    loss mixes cells of very different difficulty, which makes plateaus hard to see)."""

    def learning_rate_at(self, step: int) -> float:
        """The cosine rate for the 0-based ``step`` (only for ``lr_schedule='cosine'``)."""
        progress = min(max(step / self.max_steps, 0.0), 1.0)
        span = self.learning_rate - self.min_learning_rate
        return self.min_learning_rate + 0.5 * span * (1 + math.cos(math.pi * progress))

    def __post_init__(self) -> None:
        if self.lr_schedule not in ('plateau', 'cosine'):
            raise ValueError(
                f"lr_schedule must be 'plateau' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.max_steps < 1:
            raise ValueError(f'max_steps must be >= 1, got {self.max_steps}')
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')
        if self.evaluate_every < 1:
            raise ValueError(f'evaluate_every must be >= 1, got {self.evaluate_every}')
        if not 0 <= self.smoothing < 1:
            raise ValueError(f'smoothing must be in [0, 1), got {self.smoothing}')


@dataclass(frozen=True)
class FitResult:
    """How a :func:`fit` run ended."""

    steps: int
    seconds: float
    smoothed_loss: float
    stopped_early: bool
    run_dir: Path
    interrupted: bool = False
    """SIGINT or SIGTERM arrived during the run: the loop stopped at the next step
    boundary (or had just reached its end) and checkpointed. A run that ends on its
    ``time_budget_s`` is not interrupted."""
    steps_by_precision: dict[str, int] = field(default_factory=dict)
    """Steps taken in each precision (``'fp32'``, ``'bf16'``) over every resumption;
    ``'unrecorded'`` counts the steps of checkpoints written before this was kept."""


class TrainingInterrupted(CahalError):
    """A stop request (SIGINT or SIGTERM) ended a :func:`fit` run that others build on.

    The run folder holds a checkpoint: running the same training again resumes there.

    Parameters
    ----------
    run_dir
        Run folder of the interrupted fit (checkpoint and loss log).
    step
        Steps done when it stopped (the step of its checkpoint).
    """

    def __init__(self, run_dir: str | os.PathLike[str], step: int) -> None:
        self.run_dir = Path(run_dir)
        self.step = step
        super().__init__(f'{self.run_dir}: training interrupted at step {step} (checkpointed)')


def _save_checkpoint(
    run_dir: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    state: dict[str, Any],
) -> None:
    from safetensors.torch import save as save_safetensors

    tensors: dict[str, torch.Tensor] = {
        f'model.{key}': value.detach().cpu().contiguous()
        for key, value in network.state_dict().items()
    }
    optimizer_state = optimizer.state_dict()
    for index, slots in optimizer_state['state'].items():
        for name, value in slots.items():
            tensors[f'optim.{index}.{name}'] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors['rng.torch'] = torch.get_rng_state()
    payload = save_safetensors(tensors)
    write_bytes_atomic(run_dir / CHECKPOINT_TENSORS, payload)
    document = {
        **state,
        'tensors_sha256': hashlib.sha256(payload).hexdigest(),
        'param_groups': optimizer_state['param_groups'],
        'scheduler': scheduler.state_dict(),
    }
    write_bytes_atomic(run_dir / CHECKPOINT_STATE, json.dumps(document, indent=1).encode())


def _load_checkpoint(
    run_dir: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
) -> dict[str, Any] | None:
    from safetensors.torch import load as load_safetensors

    state_path = run_dir / CHECKPOINT_STATE
    if not state_path.exists():
        return None
    document = json.loads(state_path.read_text())
    payload = (run_dir / CHECKPOINT_TENSORS).read_bytes()
    if hashlib.sha256(payload).hexdigest() != document['tensors_sha256']:
        raise RuntimeError(f'{run_dir}: checkpoint tensors do not match their sha256')
    tensors = load_safetensors(payload)
    network.load_state_dict(
        {key[len('model.') :]: value for key, value in tensors.items() if key.startswith('model.')}
    )
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith('optim.'):
            _, index, name = key.split('.', 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({'state': slots, 'param_groups': document['param_groups']})
    scheduler.load_state_dict(document['scheduler'])
    torch.set_rng_state(tensors['rng.torch'])
    return document


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from."""
    if not log_path.exists():
        return
    with log_path.open(newline='') as stream:
        rows = list(csv.reader(stream))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= step]
    with log_path.open('w', newline='') as stream:
        csv.writer(stream).writerows(kept)


@contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (main thread only)."""
    requested: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(
                number, lambda signum, frame: requested.append(signum)
            )
    try:
        yield lambda: bool(requested)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def fit(
    network: nn.Module,
    stream: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Mapping[str, float]]],
    *,
    run_dir: str | os.PathLike[str],
    schedule: TrainingSchedule,
    device: torch.device | str = 'cpu',
    mixed_precision: bool = False,
    channels_last: bool | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``network`` on batches from ``stream``, resuming from ``run_dir`` if possible.

    ``stream`` yields objects with ``inputs`` and ``targets`` tensors and has
    ``state()``/``set_state()`` for its random generator. ``loss_fn(pred, target)``
    returns the total loss and a mapping of named terms to log. With
    ``mixed_precision`` the network runs under bfloat16 autocast (CUDA or CPU; the
    weights, optimizer state and loss stay float32: the prediction is cast back before
    ``loss_fn``, which therefore computes its Fourier term in float32).
    ``channels_last`` (default: on CPU) runs the network and batches channels-last (3D),
    which oneDNN convolves faster; the numbers are the same up to rounding.

    SIGINT or SIGTERM (caught in the main thread only) ends the run at the next step
    boundary with a checkpoint and ``interrupted=True`` in the result; it does not
    raise, so a caller that goes on to other work must check that flag.
    """
    from tqdm import tqdm

    device = torch.device(device)
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    network.to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=schedule.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode='min',
        factor=0.5,
        patience=schedule.plateau_patience,
        min_lr=schedule.min_learning_rate,
    )
    state = _load_checkpoint(folder, network, optimizer, scheduler)
    # the schedule in force is the caller's; a checkpoint only brings back the counters
    scheduler.patience = schedule.plateau_patience
    scheduler.min_lrs = [schedule.min_learning_rate] * len(optimizer.param_groups)
    if state is None:
        state = {
            'step': 0,
            'seconds': 0.0,
            'smoothed_loss': None,
            'best_loss': None,
            'looks_without_improvement': 0,
            'stopped_early': False,
            'metadata': dict(metadata or {}),
        }
    else:
        stream.set_state(state['stream'])
        state['stopped_early'] = state['looks_without_improvement'] >= schedule.early_stop_patience
        if 'steps_by_precision' not in state and state['step']:
            state['steps_by_precision'] = {'unrecorded': state['step']}
    steps_by_precision: dict[str, int] = state.setdefault('steps_by_precision', {})
    log_path = folder / LOSS_LOG
    _truncate_log(log_path, state['step'])
    new_log = not log_path.exists()
    use_autocast = mixed_precision and device.type in {'cuda', 'cpu'}
    if channels_last is None:
        channels_last = device.type == 'cpu'
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    network.to(memory_format=memory_format)
    precision = 'bf16' if use_autocast else 'fp32'

    started = time.monotonic() - state['seconds']
    last_checkpoint = time.monotonic()
    bar = tqdm(
        total=schedule.max_steps,
        initial=state['step'],
        disable=not progress,
        desc=str(metadata.get('name', 'fit')) if metadata else 'fit',
        dynamic_ncols=True,
    )

    def checkpoint() -> None:
        state['seconds'] = time.monotonic() - started
        state['stream'] = stream.state()
        _save_checkpoint(folder, network, optimizer, scheduler, state)

    with _stop_requests() as stop_requested, log_path.open('a', newline='') as log_stream:
        writer = csv.writer(log_stream)
        header_written = not new_log
        while state['step'] < schedule.max_steps and not state['stopped_early']:
            if schedule.time_budget_s is not None and (
                time.monotonic() - started >= schedule.time_budget_s
            ):
                break
            if stop_requested():
                LOGGER.warning(
                    '%s: stop requested, checkpointing at step %d', folder, state['step']
                )
                break
            if schedule.lr_schedule == 'cosine':
                for group in optimizer.param_groups:
                    group['lr'] = schedule.learning_rate_at(state['step'])
            batch = next(stream)
            inputs = batch.inputs.to(device, non_blocking=True, memory_format=memory_format)
            targets = batch.targets.to(device, non_blocking=True, memory_format=memory_format)
            with torch.autocast(
                device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast
            ):
                prediction = network(inputs)
            total, terms = loss_fn(prediction.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if schedule.gradient_clip is not None:
                nn.utils.clip_grad_norm_(network.parameters(), schedule.gradient_clip)
            optimizer.step()
            state['step'] += 1
            steps_by_precision[precision] = steps_by_precision.get(precision, 0) + 1
            value = float(total.detach())
            previous = state['smoothed_loss']
            state['smoothed_loss'] = (
                value
                if previous is None
                else schedule.smoothing * previous + (1 - schedule.smoothing) * value
            )
            if not header_written:
                writer.writerow(['step', 'seconds', 'loss', 'smoothed_loss', 'lr', *terms])
                header_written = True
            writer.writerow(
                [
                    state['step'],
                    f'{time.monotonic() - started:.2f}',
                    f'{value:.6g}',
                    f'{state["smoothed_loss"]:.6g}',
                    f'{optimizer.param_groups[0]["lr"]:.3g}',
                    *(f'{float(v):.6g}' for v in terms.values()),
                ]
            )
            if state['step'] % schedule.evaluate_every == 0:
                smoothed = state['smoothed_loss']
                if schedule.lr_schedule == 'plateau':
                    scheduler.step(smoothed)
                if state['best_loss'] is None or smoothed < state['best_loss'] * (1 - 1e-3):
                    state['best_loss'] = smoothed
                    state['looks_without_improvement'] = 0
                else:
                    state['looks_without_improvement'] += 1
                    if state['looks_without_improvement'] >= schedule.early_stop_patience:
                        state['stopped_early'] = True
                log_stream.flush()
            bar.update(1)
            bar.set_postfix(loss=f'{state["smoothed_loss"]:.4f}', refresh=False)
            if time.monotonic() - last_checkpoint >= schedule.checkpoint_every_s:
                log_stream.flush()
                checkpoint()
                last_checkpoint = time.monotonic()
        # the last checkpoint is still under the stop handlers, so a signal cannot cut it short
        log_stream.flush()
        bar.close()
        checkpoint()
        interrupted = stop_requested()
    return FitResult(
        steps=state['step'],
        seconds=state['seconds'],
        smoothed_loss=float(state['smoothed_loss'] or math.nan),
        stopped_early=bool(state['stopped_early']),
        run_dir=folder,
        interrupted=interrupted,
        steps_by_precision=dict(steps_by_precision),
    )
