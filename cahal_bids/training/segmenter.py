"""Training the frozen tissue segmenter behind the semantic loss, and its validation Dice.

The network, its storage and inference live in :mod:`cahal_bids.engine.segmenter`;
this module fits one on prepared ``(image, labels)`` pairs (``cahal-train segmenter``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cahal_bids.core.metrics import dice_per_class
from cahal_bids.core.validation import check_int
from cahal_bids.engine.networks import freeze
from cahal_bids.engine.segmenter import (
    DEFAULT_CLASS_NAMES,
    TissueSegmenter,
    save_segmenter,
    segment_volume,
)
from cahal_bids.training.losses import soft_dice

__all__ = ['train_segmenter', 'validation_dice']

logger = logging.getLogger(__name__)


def validation_dice(
    model: TissueSegmenter,
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str],
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
) -> dict[str, dict[str, float]]:
    """Dice of each tissue class (background left out) against the proxy labels."""
    report: dict[str, dict[str, float]] = {}
    for (image, labels), name in zip(volumes, names, strict=True):
        scores = dice_per_class(segment_volume(model, image), labels, len(class_names))
        report[name] = {
            class_names[label]: round(score, 4)
            for label, score in scores.items()
            if label > 0 and math.isfinite(score)
        }
    return report


def _check_training_pairs(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(volumes) == 0:
        raise ValueError('volumes must hold at least one (image, labels) pair')
    pairs = []
    for index, pair in enumerate(volumes):
        if len(pair) != 2:
            raise ValueError(f'volumes[{index}] must be an (image, labels) pair')
        image = np.asarray(pair[0], dtype=np.float32)
        labels = np.asarray(pair[1])
        if image.ndim != 3 or labels.shape != image.shape:
            raise ValueError(
                f'volumes[{index}]: image and labels must be 3D of the same shape, got '
                f'{image.shape} and {labels.shape}'
            )
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.array_equal(labels, np.round(labels)):
                raise ValueError(f'volumes[{index}]: labels must be integers')
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f'volumes[{index}]: labels must lie in [0, {n_classes - 1}], got '
                f'[{labels.min()}, {labels.max()}]'
            )
        if not np.isfinite(image).all():
            raise ValueError(f'volumes[{index}]: image holds non-finite values')
        pairs.append((image, labels))
    return pairs


def _pad_to(array: np.ndarray, size: int, value: float) -> np.ndarray:
    pads = [(0, max(0, size - n)) for n in array.shape]
    return np.pad(array, pads, constant_values=value) if any(p[1] for p in pads) else array


def _sample_batch(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    patch_size: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((batch_size, 1, patch_size, patch_size, patch_size), np.float32)
    labels = np.empty((batch_size, patch_size, patch_size, patch_size), np.int64)
    for item in range(batch_size):
        image, label = pairs[int(rng.integers(len(pairs)))]
        corner = [int(rng.integers(n - patch_size + 1)) for n in image.shape]
        window = tuple(slice(c, c + patch_size) for c in corner)
        gain = rng.uniform(0.9, 1.1)
        gamma = math.exp(rng.uniform(-0.3, 0.3))
        images[item, 0] = gain * np.power(np.clip(image[window], 0.0, None), gamma)
        labels[item] = label[window]
    return images, labels


def _recalibrate_batch_norm(
    model: TissueSegmenter,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    patch_size: int,
    batch_size: int,
    device: torch.device,
    batches: int = 16,
) -> None:
    """Replace batch-norm running statistics by exact averages for the final weights.

    During training the running statistics trail weights that keep changing; a few
    forward passes with a cumulative average (``momentum=None``) fix them.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            images, _labels = _sample_batch(pairs, rng, patch_size, batch_size)
            model(torch.from_numpy(images).to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def train_segmenter(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    steps: int,
    patch_size: int = 64,
    batch_size: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = 'cpu',
    log_every: int = 50,
    checkpoint: Path | None = None,
    config: Mapping[str, Any] | None = None,
    modality: str = 'T1w',
) -> TissueSegmenter:
    """Train a :class:`TissueSegmenter` on random patches of ``(image, labels)`` pairs.

    Parameters
    ----------
    volumes:
        ``(image, labels)`` pairs of 1 mm volumes: images intensity-normalised to about
        [0, 1], labels integers in ``[0, n_classes)`` of the same shape. Volumes
        smaller than ``patch_size`` are padded (image 0, label 0).
    steps, patch_size, batch_size, lr:
        Adam steps, cubic patch side, patches per step, learning rate.
    seed:
        Seeds the initial weights (without touching the global RNG), the patch
        positions and the augmentation: equal seeds give equal networks on CPU.
    log_every:
        Log the mean loss every this many steps (``logging``, logger of this module).
    checkpoint:
        If given, a folder where :func:`save_segmenter` writes the current network at
        every log step and at the end, with its provenance (no validation).
    config:
        :class:`TissueSegmenter` hyperparameters (defaults: :meth:`TissueSegmenter.config`).
    modality:
        Recorded in the checkpoint's manifest.

    The loss is cross-entropy plus ``1 - mean soft Dice`` over the foreground
    classes; each patch gets a random gain in [0.9, 1.1] and gamma in
    ``exp([-0.3, 0.3])`` (on intensities clipped at 0). After the last step, batch-norm
    running statistics are recomputed as exact averages over 16 further batches for the
    final weights (they otherwise trail the changing weights, which costs much Dice
    after short runs). Returns the trained network frozen and in eval mode, on
    ``device``.
    """
    steps = check_int('steps', steps, 1)
    patch_size = check_int('patch_size', patch_size, 1)
    batch_size = check_int('batch_size', batch_size, 1)
    log_every = check_int('log_every', log_every, 1)
    seed = check_int('seed', seed, 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f'lr must be a positive number, got {lr!r}')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TissueSegmenter.from_config(dict(config or {}))
    if patch_size % model.size_multiple:
        logger.warning(
            'patch_size %d is not a multiple of %d: every patch is padded internally',
            patch_size,
            model.size_multiple,
        )
    pairs = [
        (_pad_to(image, patch_size, 0.0), _pad_to(labels, patch_size, 0))
        for image, labels in _check_training_pairs(volumes, model.n_classes)
    ]
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=float(lr))
    provenance = {
        'trainer': 'cahal_bids.training.segmenter.train_segmenter',
        'training_volumes': len(pairs),
        'patch_size': patch_size,
        'batch_size': batch_size,
        'lr': float(lr),
        'seed': seed,
        'steps': steps,
        'loss': 'cross-entropy + (1 - soft Dice over foreground classes)',
        'augmentation': 'gain U(0.9, 1.1), gamma exp(U(-0.3, 0.3))',
    }
    running = 0.0
    for step in range(1, steps + 1):
        images, labels = _sample_batch(pairs, rng, patch_size, batch_size)
        x = torch.from_numpy(images).to(device)
        target = torch.from_numpy(labels).to(device)
        logits = model(x)
        one_hot = F.one_hot(target, model.n_classes).permute(0, 4, 1, 2, 3).to(logits.dtype)
        dice = soft_dice(torch.softmax(logits, dim=1)[:, 1:], one_hot[:, 1:])
        loss = F.cross_entropy(logits, target) + (1.0 - dice.mean())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running += float(loss.detach())
        if step % log_every == 0 or step == steps:
            count = step % log_every or log_every
            logger.info('segmenter step %d/%d: loss %.4f', step, steps, running / count)
            running = 0.0
            if checkpoint is not None:
                save_segmenter(
                    model,
                    checkpoint,
                    modality=modality,
                    provenance={**provenance, 'steps_completed': step},
                )
    _recalibrate_batch_norm(model, pairs, rng, patch_size, batch_size, device)
    freeze(model)
    return model
