"""Enhance one image: route, resample to the native 1 mm grid, run one expert.

:class:`Enhancer` opens a zoo once (like a predictor object loading a model folder)
and then serves many images, in memory (:meth:`Enhancer.enhance`, a nibabel image in,
an :class:`EnhancedImage` out) or file to file (:meth:`Enhancer.enhance_file`). The
pipeline for one image is:

validate -> canonical RAS (lossless) -> robust intensity normalisation ->
trilinear to the native 1 mm grid -> expert (tiled, memory-aware) -> consistency
guard (:mod:`cahal_bids.engine.consistency_guard`: the output acquired again against the
input, next to the trilinear reference; optionally projected onto the acquired data)
-> undo the normalisation -> back to the input's own voxel axes, with a provenance
record of every decision (for files: written atomically, with the record as a JSON
sidecar). A restored image that agrees less with the acquired data than trilinear
interpolation is flagged in the record and logged as a WARNING (logger of this module).

Images already at 1 mm or finer along every axis come back unchanged (same grid,
same values) and the provenance says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cahal_bids import __version__
from cahal_bids.core.atomic import write_json_atomic
from cahal_bids.core.errors import CahalError
from cahal_bids.core.routing import Route, route
from cahal_bids.engine.consistency_guard import (
    DEFAULT_PROJECTION,
    inconsistency_message,
    projection_mode,
)
from cahal_bids.engine.devices import PRECISIONS, resolve_device, resolve_precision

if TYPE_CHECKING:
    import nibabel
    import torch

    from cahal_bids.core.nifti import LoadedImage
    from cahal_bids.engine.networks import ResidualUNet3D
    from cahal_bids.engine.zoo import ExpertChoice, Zoo

logger = logging.getLogger(__name__)

OUTPUT_COPIES = 6
"""Float32 volumes of the output grid alive at once outside the network (RAS copies,
normalised input, upsampled input, output, reoriented output): the memory a restore
needs besides the expert's own, which tiling bounds."""
PROJECTION_COPIES = 2
"""More such volumes alive while the output is projected onto the acquired data."""

__all__ = [
    'IN_MEMORY_HASH',
    'PRECISIONS',
    'EnhanceResult',
    'EnhancedImage',
    'Enhancer',
    'resolve_device',
    'resolve_precision',
    'sidecar_path_for',
    'write_json_atomic',
]


def sidecar_path_for(image_path: str | os.PathLike[str]) -> Path:
    """``out.nii.gz`` -> ``out.json`` (the BIDS convention for sidecars)."""
    from cahal_bids.core.nifti import nifti_stem

    path = Path(image_path)
    return path.with_name(nifti_stem(path) + '.json')


def _open_zoo(zoo: Zoo | str | os.PathLike[str]) -> Zoo:
    """A modality name opens the shipped zoo, a path opens that folder, a Zoo is kept."""
    from cahal_bids.engine.zoo import SHIPPED_ZOOS, Zoo, default_zoo_path

    if isinstance(zoo, Zoo):
        return zoo
    if isinstance(zoo, str) and zoo in SHIPPED_ZOOS:
        return Zoo.open(default_zoo_path(zoo))
    if isinstance(zoo, (str, os.PathLike)):
        return Zoo.open(zoo)
    raise TypeError(f'zoo must be a modality name, a zoo folder or a Zoo, got {type(zoo)!r}')


def software_versions() -> dict[str, str]:
    """Versions of the libraries that shape the output."""
    import nibabel
    import torch

    return {
        'cahal-bids': __version__,
        'python': platform.python_version(),
        'torch': torch.__version__,
        'numpy': np.__version__,
        'nibabel': nibabel.__version__,
    }


IN_MEMORY_HASH = 'sha256 of the NIfTI header block, then of the float32 voxels in C order'
"""What ``input_sha256`` covers for an image enhanced in memory (a file's is its bytes)."""


@dataclass(frozen=True)
class EnhancedImage:
    """What :meth:`Enhancer.enhance` returns: the restored image and its provenance."""

    image: nibabel.Nifti1Image
    """The restored image on the native 1 mm grid (float32), or the input's voxels on
    its own grid when it was already at 1 mm or finer (:attr:`skipped`)."""
    provenance: dict[str, Any]
    """Every decision, as :meth:`Enhancer.enhance_file` writes it to the JSON sidecar:
    the input (``input``, ``input_sha256``, its shape and voxel sizes), the routing
    (``V``, ``A``, ``cell``, ``skipped``), the zoo and the expert (``expert``: cell,
    file, sha256, substitution), ``device``, ``precision``, tiling, normalisation,
    ``consistency`` (the guard's record, see
    :func:`~cahal_bids.engine.consistency_guard.consistency_guard`; absent when skipped),
    ``output_shape`` and ``output_affine``, ``warnings``, ``seconds`` and the
    ``software`` versions. For an image enhanced in memory ``input`` is None and
    ``input_hashed`` says what ``input_sha256`` covers
    (:data:`~cahal_bids.engine.inference.IN_MEMORY_HASH`)."""

    @property
    def skipped(self) -> bool:
        """True when the input was already at 1 mm or finer and is returned unchanged."""
        return bool(self.provenance['skipped'])

    @property
    def skip_reason(self) -> str | None:
        """Why the image was returned unchanged (None when it was restored)."""
        if not self.skipped:
            return None
        sizes = ' x '.join(f'{size:g}' for size in self.provenance['voxel_sizes'])
        return (
            f'already at 1 mm or finer along every axis ({sizes} mm): routing skips it, '
            'so it is returned unchanged'
        )


@dataclass(frozen=True)
class EnhanceResult:
    """What :meth:`Enhancer.enhance_file` wrote."""

    output_path: Path
    """The restored image (``.nii`` or ``.nii.gz``)."""
    sidecar_path: Path
    """Its JSON sidecar (:func:`sidecar_path_for`)."""
    sidecar: dict[str, Any]
    """The sidecar's content, the :attr:`EnhancedImage.provenance` of the file."""


class Enhancer:
    """Serve one zoo's experts to many images.

    >>> enhancer = Enhancer('T1w', device='cpu')  # doctest: +SKIP
    >>> enhancer.enhance(nibabel.load('sub-01_T1w.nii.gz')).image.shape  # doctest: +SKIP
    (182, 218, 182)

    Parameters
    ----------
    zoo
        ``'T1w'``, ``'FLAIR'`` or ``'T2w'``: the zoo shipped with the package for that
        contrast (:func:`~cahal_bids.engine.zoo.default_zoo_path`; the route table sends
        FLAIR to the T1w zoo), serving images of that contrast; any other string or path:
        the zoo folder there (write ``'./T1w'`` for a folder of that name); or an
        opened :class:`~cahal_bids.engine.zoo.Zoo`, used as it is. The zoo is opened
        (and every expert's sha256 checked) once, here.
    device
        ``'auto'`` (CUDA when available, else the CPU), ``'cpu'``, ``'cuda'``,
        ``'cuda:N'`` (see :func:`resolve_device`) or a :class:`torch.device`.
    tile_size
        Cubic tile edge in voxels; ``None`` picks the largest that fits in the
        memory available on ``device``.
    overlap
        Fraction of a tile shared with its neighbours.
    progress
        Show a progress bar on stderr for multi-tile runs.
    precision
        ``'fp32'``, ``'bf16'`` (the expert's convolutions under bfloat16 autocast,
        about twice as fast on CPUs with AVX512-BF16; the global residual addition and
        the normalisation stay in float32) or ``'auto'`` (default; see
        :func:`resolve_precision`). The precision used is recorded in the sidecar.
    contrast
        The contrast (BIDS suffix) of the images served, i.e. their route, recorded in
        the sidecar as ``route`` beside the zoo; None (default): the contrast named by
        ``zoo`` (``Enhancer('T2w')``), else the zoo's own modality.
        A zoo serves its own modality and the routes that the route table lends it
        (:func:`~cahal_bids.engine.zoo.serving_modalities`: a T1w zoo serves FLAIR
        images); any other contrast raises :class:`~cahal_bids.engine.zoo.ZooError`.
    consistency_projection
        What follows the expert: ``'off'``, ``'adaptive'`` or ``'exact'`` projection onto
        the acquired data (``True``/``False``: exact/off; default
        :data:`~cahal_bids.engine.consistency_guard.DEFAULT_PROJECTION`; see
        :func:`~cahal_bids.engine.consistency_guard.consistency_guard`). The sidecar's
        ``consistency.projection`` records it.
    """

    def __init__(
        self,
        zoo: Zoo | str | os.PathLike[str],
        *,
        device: torch.device | str = 'auto',
        tile_size: int | None = None,
        overlap: float = 0.5,
        progress: bool = False,
        precision: str = 'auto',
        contrast: str | None = None,
        consistency_projection: str | bool = DEFAULT_PROJECTION,
    ) -> None:
        if tile_size is not None and tile_size < 8:
            raise ValueError(f'tile_size must be at least 8 voxels, got {tile_size}')
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
        device = resolve_device(device) if isinstance(device, str) else device
        self.precision = resolve_precision(precision, device)
        self.zoo = _open_zoo(zoo)
        self.device = device
        self.tile_size = tile_size
        self.overlap = overlap
        self.progress = progress
        self.consistency_projection = projection_mode(consistency_projection)
        self._experts: dict[str, ResidualUNet3D] = {}
        if contrast is None:
            from cahal_bids.engine.zoo import ROUTED_MODALITIES

            routed = isinstance(zoo, str) and zoo in ROUTED_MODALITIES
            contrast = str(zoo) if routed else self.zoo.modality
        self.contrast = contrast
        self.zoo.check_serves(self.contrast)

    def expert(self, choice: ExpertChoice) -> ResidualUNet3D:
        """The network for an expert choice, built and loaded once."""
        import torch

        from cahal_bids.engine.networks import ResidualUNet3D

        if choice.cell not in self._experts:
            architecture = self.zoo.architecture
            network = ResidualUNet3D.from_config(architecture['config'])
            network.load_state_dict(self.zoo.load_state_dict(choice.cell))
            network.eval().to(self.device)
            if self.device.type == 'cpu':
                # oneDNN's 3D convolutions are about 15 % faster in channels-last layout
                network.to(memory_format=torch.channels_last_3d)
            self._experts[choice.cell] = network
        return self._experts[choice.cell]

    def _run_expert(
        self, network: ResidualUNet3D, volume: torch.Tensor, foreground_level: float
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Run ``network`` whole when it fits, else tiled so that tiles match the whole.

        Instance-norm statistics follow the zoo's ``norm_statistics``: ``patch-mean``
        (:mod:`cahal_bids.engine.patch_statistics`; patches centred on voxels above
        ``foreground_level``; folded into the convolutions) or the whole volume's
        (measured layer by layer from blocks when tiling). Tiles share these frozen
        statistics, start on the network's pooling grid and drop a margin of the
        network's reach at every cut face, so the tiled output equals the whole-volume
        output to float rounding. When the requested tile is too small for that margin,
        the margin shrinks to what the tile allows (approximate).
        """
        import torch

        from cahal_bids.engine.activation_memory import estimate_peak_bytes_per_voxel
        from cahal_bids.engine.norm_statistics import estimate_norm_statistics
        from cahal_bids.engine.patch_statistics import patch_mean_statistics
        from cahal_bids.engine.tiling import (
            available_memory_bytes,
            choose_tile_size,
            run_tiled_with_fallback,
        )

        shape = tuple(int(n) for n in volume.shape[2:])
        multiple = network.size_multiple
        if self.tile_size is None:
            per_voxel = estimate_peak_bytes_per_voxel(network.config())
            tile = choose_tile_size(
                shape, per_voxel, available_memory_bytes(self.device), multiple=max(8, multiple)
            )
        else:
            tile = (self.tile_size,) * 3
        whole = all(t >= n for t, n in zip(tile, shape, strict=True))
        method = self.zoo.norm_statistics
        if method['method'] == 'patch-mean':
            statistics = patch_mean_statistics(
                network,
                volume,
                foreground_level=foreground_level,
                patch_size=method['patch_size'],
                patches=method['patches'],
                seed=method['seed'],
                # no more voxels at once than the tile memory allows
                batch_size=max(1, math.prod(tile) // method['patch_size'] ** 3),
            )
            # frozen norms are per-channel affine maps: fold them into the convolutions
            predictor = network.with_folded_norms(statistics)
            if self.device.type == 'cpu':
                predictor.to(memory_format=torch.channels_last_3d)
            frozen = contextlib.nullcontext()
        elif whole:
            return network(volume), shape  # type: ignore[return-value]
        else:
            predictor = network
            frozen = network.frozen_norm_statistics(
                estimate_norm_statistics(network, volume, block_size=tile)
            )
        with frozen:
            if whole:
                return predictor(volume), shape  # type: ignore[return-value]
            margin = min(network.receptive_field_radius, (min(tile) - multiple) // 2)
            return run_tiled_with_fallback(
                volume,
                predictor,
                tile_size=tile,
                overlap=self.overlap,
                progress=self.progress,
                min_size=max(8, multiple),
                multiple=max(8, multiple),
                alignment=multiple,
                margin=max(margin, 0),
            )

    def _check_output_fits(self, shape: tuple[int, int, int]) -> None:
        """Refuse an output grid whose few float32 copies cannot be held in memory."""
        from cahal_bids.engine.tiling import available_memory_bytes

        voxels = int(np.prod(shape))
        projecting = self.consistency_projection != 'off'
        copies = OUTPUT_COPIES + (PROJECTION_COPIES if projecting else 0)
        needed = voxels * 4 * copies
        available = available_memory_bytes('cpu')
        if needed > available:
            raise CahalError(
                f'the 1 mm output grid {list(shape)} ({voxels} voxels) needs about '
                f'{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB of memory is available'
            )

    def restore(
        self,
        data: np.ndarray,
        affine: np.ndarray,
        decision: Route,
        *,
        projection: str | None = None,
        acquired: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Restore one validated array; returns (1 mm data, its affine, run details).

        The details hold the consistency guard's record under ``consistency``.
        ``projection`` overrides the enhancer's ``consistency_projection`` for this call;
        ``acquired`` (same grid as ``data``) is the raw acquisition ``data`` was denoised
        from, which the projection then aims at (see
        :func:`~cahal_bids.engine.consistency_guard.consistency_guard`).
        """
        import torch

        from cahal_bids.core.axis_order import inverse, thickest_last
        from cahal_bids.core.grid import native_grid, resample_to_native_grid
        from cahal_bids.core.normalization import RobustScale, head_threshold
        from cahal_bids.core.orientation import Reorientation
        from cahal_bids.engine.consistency_guard import guard_routed

        if decision.cell is None:
            raise ValueError('restore() needs a routed (not skipped) image')
        if acquired is not None and acquired.shape != data.shape:
            raise ValueError(
                f'acquired data of shape {acquired.shape} is not on the grid {data.shape}'
            )
        choice = self.zoo.choose(decision.cell)
        grid = native_grid(data.shape, affine)
        self._check_output_fits(grid.shape)
        network = self.expert(choice)
        reorientation = Reorientation.from_affine(affine, data.shape)
        ras = reorientation.to_ras(np.ascontiguousarray(data, dtype=np.float32))
        scaler = RobustScale.from_config(self.zoo.normalization, ras)
        normalized = scaler.normalize(ras)
        # the head level centres patch-mean statistics' patches and bounds the guard's mask
        head_level = head_threshold(
            normalized,
            head_fraction=scaler.head_fraction,
            reference_percentile=scaler.head_reference_percentile,
        )
        threshold = head_level if self.zoo.norm_statistics['method'] == 'patch-mean' else None
        ras_sizes = reorientation.sizes_to_ras(decision.voxel_sizes)
        ras_out_shape = reorientation.sizes_to_ras(grid.shape)
        order = (
            thickest_last(reorientation.sizes_to_ras(decision.routed_sizes))
            if self.zoo.axis_order == 'thickest-last'
            else (0, 1, 2)
        )
        with torch.inference_mode():
            low = torch.from_numpy(np.ascontiguousarray(normalized))
            low = low.to(self.device, torch.float32)
            upsampled = resample_to_native_grid(
                low, ras_sizes, ras_out_shape, flipped=reorientation.flipped_in_ras
            )
            with torch.autocast(
                device_type=self.device.type,
                dtype=torch.bfloat16,
                enabled=self.precision == 'bf16',
            ):
                restored, tile_used = self._run_expert(
                    network,
                    upsampled.permute(order).contiguous()[None, None],
                    0.0 if threshold is None else threshold,
                )
            restored_ras = restored[0, 0].permute(inverse(order)).to('cpu', torch.float32)
            if acquired is not None:
                raw = reorientation.to_ras(np.ascontiguousarray(acquired, dtype=np.float32))
                acquired = torch.from_numpy(np.ascontiguousarray(scaler.normalize(raw)))
            restored_ras, consistency = guard_routed(
                restored_ras,
                upsampled,
                low,
                (ras_sizes, ras_out_shape, reorientation.flipped_in_ras),
                head_level,
                projection=self.consistency_projection if projection is None else projection,
                raw=acquired,
            )
            restored_ras = np.ascontiguousarray(restored_ras.numpy())
            tile_used = tuple(tile_used[axis] for axis in inverse(order))
        output = reorientation.from_ras(scaler.denormalize(restored_ras)).astype(np.float32)
        details = {
            'expert': {
                'requested_cell': choice.requested_cell,
                'cell': choice.cell,
                'substituted': choice.substituted,
                'file': choice.file,
                'sha256': choice.sha256,
            },
            'normalization': scaler.as_dict(),
            'norm_statistics': self.zoo.norm_statistics,
            'axis_order': self.zoo.axis_order,
            'tile_size': list(tile_used),
            'precision': self.precision,
            'tiled': tile_used != tuple(restored_ras.shape),
            'consistency': consistency,
        }
        return np.ascontiguousarray(output), grid.affine, details

    def enhance(self, image: nibabel.Nifti1Image) -> EnhancedImage:
        """Restore an in-memory NIfTI-1/NIfTI-2 image (e.g. from :func:`nibabel.load`).

        The image is validated as a file is (:func:`~cahal_bids.core.nifti.validate_image`:
        :class:`~cahal_bids.core.errors.InvalidImageError` for NaN voxels, several
        volumes, a singular affine...), routed by its voxel sizes and restored by one
        expert; an image already at 1 mm or finer along every axis comes back unchanged
        (same grid, same values as float32; :attr:`EnhancedImage.skip_reason`). The
        restored image is the one :meth:`enhance_file` writes for the same image.
        """
        from cahal_bids.core.nifti import validate_image

        started = time.perf_counter()
        loaded = validate_image(image)
        digest = hashlib.sha256(loaded.header.binaryblock)
        digest.update(loaded.data.data)  # C-contiguous float32: hashed without a copy
        source = {
            'input': None,
            'input_sha256': digest.hexdigest(),
            'input_hashed': IN_MEMORY_HASH,
        }
        return self._enhance(loaded, source, started)

    def _enhance(
        self,
        image: LoadedImage,
        source: dict[str, Any],
        started: float,
        acquired: np.ndarray | None = None,
    ) -> EnhancedImage:
        """Route and restore a validated image; ``source`` opens the provenance."""
        from cahal_bids.core.nifti import nifti_image

        decision = route(image.voxel_sizes)
        provenance: dict[str, Any] = {
            **source,
            'shape': list(image.shape),
            'voxel_sizes': list(image.voxel_sizes),
            'routed_voxel_sizes': list(decision.routed_sizes),
            'V': decision.volume,
            'A': decision.anisotropy,
            'cell': decision.cell,
            'skipped': decision.skip,
            'route': self.contrast,
            'zoo': self.zoo.record(),
            'device': str(self.device),
            'warnings': list(image.warnings),
        }
        if decision.skip:
            output, affine = image.data, image.affine
            provenance.update(expert=None, tile_size=None)
        else:
            output, affine, details = self.restore(
                image.data, image.affine, decision, acquired=acquired
            )
            provenance.update(details)
            self._warn_if_inconsistent(provenance)
        provenance['output_shape'] = list(output.shape)
        provenance['output_affine'] = np.asarray(affine).tolist()
        restored = nifti_image(output, affine, header_like=image.header)
        provenance['seconds'] = round(time.perf_counter() - started, 3)
        provenance['software'] = software_versions()
        return EnhancedImage(image=restored, provenance=provenance)

    @staticmethod
    def _warn_if_inconsistent(provenance: dict[str, Any]) -> None:
        """Log (and list in ``warnings``) a restored image less consistent than trilinear."""
        message = inconsistency_message(provenance.get('consistency') or {})
        if message is not None:
            provenance['warnings'].append(message)
            logger.warning('%s: %s', provenance.get('input') or 'the in-memory image', message)

    def enhance_file(
        self,
        input_path: str | os.PathLike[str],
        output_path: str | os.PathLike[str],
        *,
        acquired_path: str | os.PathLike[str] | None = None,
    ) -> EnhanceResult:
        """Enhance one NIfTI file and write the result and its JSON sidecar.

        The file is loaded and validated (:func:`~cahal_bids.core.nifti.load_image`),
        restored as :meth:`enhance` restores an image, then the image and the sidecar
        (the provenance, with ``input`` the file and ``input_sha256`` its bytes' sha256,
        ``seconds`` including the write) are written atomically. ``acquired_path`` names
        the raw acquisition a denoised input was made from (same grid), which the
        projection then aims at (:meth:`restore`); the provenance records it.
        """
        from cahal_bids.core.hashing import file_sha256
        from cahal_bids.core.nifti import load_image, write_image

        started = time.perf_counter()
        source = Path(input_path)
        target = Path(output_path)
        if target.exists() and source.exists() and target.resolve() == source.resolve():
            raise CahalError(f'{target}: refusing to overwrite the input image')
        image = load_image(source)
        origin = {'input': str(source), 'input_sha256': file_sha256(source)}
        acquired = None
        if acquired_path is not None:
            raw = load_image(acquired_path)
            if raw.shape != image.shape or not np.allclose(raw.affine, image.affine, atol=1e-4):
                raise CahalError(f'{acquired_path}: not on the grid of {source}')
            acquired = raw.data
            origin['acquired_input'] = str(acquired_path)
        enhanced = self._enhance(image, origin, started, acquired)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(enhanced.image, target)
        sidecar = enhanced.provenance
        sidecar['seconds'] = round(time.perf_counter() - started, 3)
        sidecar_file = sidecar_path_for(target)
        write_json_atomic(sidecar_file, sidecar)
        return EnhanceResult(output_path=target, sidecar_path=sidecar_file, sidecar=sidecar)
