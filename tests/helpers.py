"""Helpers shared by the tests: plain functions, imported as ``from helpers import ...``.

pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in ``pyproject.toml``), so test
modules and ``conftest.py`` import this module by name; ``conftest.py`` wraps a few of these
functions in fixtures that need ``tmp_path`` or a session scope (``make_nifti``,
``make_affine``, ``make_zoo``, ``test_zoo``).

- geometry: :func:`centred_affine`, :func:`rotation_matrix`, :func:`build_affine`;
- files: :func:`patch_nifti_header` (deliberately broken headers), :func:`write_test_zoo`,
  :func:`write_bids_dataset`, :func:`write_phantom_template`, :func:`write_app_assets`,
  :func:`head_phantom`;
- torch: :func:`smooth_volume`, :func:`random_net`, :func:`l1_loss`;
- processes: :func:`run_captured`.

torch and the package are imported inside the functions that need them, so collecting the
tests that do not use them stays cheap.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

    from cahal_bids.engine.networks import ResidualUNet3D

SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
"""``../shared/data`` beside the repository: real scans, present on CI."""


def centred_affine(shape: Sequence[int], zooms: Sequence[float]) -> np.ndarray:
    """Axis-aligned RAS affine with the given voxel sizes, centred on the field of view."""
    affine = np.diag([float(zooms[0]), float(zooms[1]), float(zooms[2]), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape[:3], dtype=float) - 1) * np.asarray(zooms[:3])
    return affine


def rotation_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    """Rodrigues rotation by ``degrees`` about ``axis`` (any non-zero length)."""
    unit = np.asarray(axis, dtype=float)
    unit = unit / np.linalg.norm(unit)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -unit[2], unit[1]], [unit[2], 0, -unit[0]], [-unit[1], unit[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def build_affine(
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
    world_axes: Sequence[int] = (0, 1, 2),
    signs: Sequence[int] = (1, 1, 1),
    degrees: float = 0.0,
    rotation_axis: Sequence[float] = (0.0, 0.0, 1.0),
    shift: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Affine whose voxel axis ``i`` has length ``zooms[i]`` and points along world axis
    ``world_axes[i]`` times ``signs[i]``, all rotated by ``degrees`` about ``rotation_axis``.

    ``world_axes=(1, 2, 0), signs=(-1, -1, 1)`` is a 'PIR' sagittal image;
    ``signs=(-1, -1, 1)`` alone is 'LPS' (DICOM order).
    """
    columns = np.zeros((3, 3))
    for axis in range(3):
        columns[world_axes[axis], axis] = signs[axis] * zooms[axis]
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(rotation_axis, degrees) @ columns
    affine[:3, 3] = shift
    return affine


def patch_nifti_header(path: Path, **fields: Any) -> Path:
    """Overwrite raw header fields of an existing ``.nii``/``.nii.gz`` file, unchecked."""
    compressed = path.name.endswith('.gz')
    raw = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    size = int(np.frombuffer(bytes(raw[:4]), dtype='<i4')[0])
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    for key, value in fields.items():
        header[key] = value
    block = header.binaryblock
    raw[: len(block)] = block
    path.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
    return path


def write_test_zoo(
    folder: Path,
    *,
    cells: Sequence[str] | None = None,
    modality: str = 'T1w',
    levels: int = 2,
    initial_filters: int = 4,
    head_scale: float = 0.05,
    seed: int = 0,
    norm_statistics: dict[str, Any] | None = None,
    axis_order: str | None = None,
) -> Path:
    """A zoo of tiny random-weight experts (non-zero heads, so they change the image)."""
    import torch

    from cahal_bids.core.normalization import DEFAULT_NORMALIZATION
    from cahal_bids.core.routing import CELLS
    from cahal_bids.engine.networks import ResidualUNet3D
    from cahal_bids.engine.zoo import write_zoo

    chosen = list(CELLS if cells is None else cells)
    experts = {}
    config: dict[str, Any] = {}
    for index, cell in enumerate(chosen):
        torch.manual_seed(seed + index)
        network = ResidualUNet3D(levels=levels, initial_filters=initial_filters)
        with torch.no_grad():
            network.head.weight.normal_(0.0, head_scale)
            network.head.bias.zero_()
        experts[cell] = network.state_dict()
        config = network.config()
    return write_zoo(
        folder,
        name='test-zoo',
        version='0.0.0',
        modality=modality,
        architecture={'name': 'ResidualUNet3D', 'config': config},
        normalization=DEFAULT_NORMALIZATION,
        experts=experts,
        norm_statistics=norm_statistics,
        axis_order=axis_order,
    )


def head_phantom(
    shape: Sequence[int], voxel_sizes: Sequence[float], *, seed: int = 0
) -> np.ndarray:
    """A smooth head-like volume: bright scalp shell, grey 'brain', darker 'ventricles'.

    Built in millimetres around the grid centre, so the same anatomy can be sampled
    on grids of any resolution (a template at 1 mm, thick-slice inputs).
    """
    rng = np.random.default_rng(seed)
    axes = [
        (np.arange(n) - (n - 1) / 2) * size for n, size in zip(shape, voxel_sizes, strict=True)
    ]
    x, y, z = np.meshgrid(*axes, indexing='ij')
    radius = np.sqrt((x / 30) ** 2 + (y / 36) ** 2 + (z / 28) ** 2)
    volume = np.where(radius < 1.0, 60.0, 0.0)
    volume = np.where(radius < 0.85, 100.0, volume)
    ventricles = np.sqrt(((x - 4) / 6) ** 2 + (y / 12) ** 2 + ((z - 3) / 5) ** 2) < 1
    volume = np.where(ventricles, 30.0, volume)
    sigma = [1.0 / size for size in voxel_sizes]
    volume = ndimage.gaussian_filter(volume, sigma)
    return (volume + rng.normal(0, 1.0, volume.shape)).clip(0).astype(np.float32)


def write_bids_dataset(root: Path, images: Sequence[tuple[str, Sequence[float]]]) -> Path:
    """A tiny BIDS dataset: ``images`` are (relative path, voxel sizes) of thick-slice phantoms."""
    root.mkdir(parents=True, exist_ok=True)
    (root / 'dataset_description.json').write_text(
        json.dumps({'Name': 'tiny phantoms', 'BIDSVersion': '1.9.0'})
    )
    for index, (relative, sizes) in enumerate(images):
        extents = (72, 84, 64)
        shape = [int(round(extent / size)) for extent, size in zip(extents, sizes, strict=True)]
        data = head_phantom(shape, sizes, seed=index)
        affine = np.diag([*sizes, 1.0])
        affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(sizes)
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units('mm', 'sec')
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.to_filename(path)
        path.with_name(path.name.replace('.nii.gz', '.json')).write_text('{}')
    return root


def write_phantom_template(path: Path) -> Path:
    """A 1 mm phantom 'template' (slightly larger head) for registration tests."""
    shape = (80, 92, 72)
    data = head_phantom(shape, (1.0, 1.0, 1.0), seed=99)
    data = np.asarray(ndimage.zoom(data, 1.05, order=1)[: shape[0], : shape[1], : shape[2]])
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(data.shape) - 1) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data.astype(np.float32), affine).to_filename(path)
    return path


def write_app_assets(
    root: Path,
    images: Sequence[tuple[str, Sequence[float]]],
    *,
    modalities: Sequence[str] = ('T1w', 'FLAIR'),
) -> dict[str, Path]:
    """What a BIDS-App run on phantoms needs, under ``root``: ``'bids'`` (the dataset of
    ``images``), ``'template'`` (template name ``Phantom``), a tiny test zoo per modality
    (``'t1w_zoo'``, ``'flair_zoo'``) and ``'root'`` itself."""
    assets = {
        'bids': write_bids_dataset(root / 'bids', images),
        'template': write_phantom_template(root / 'tpl-Phantom_T1w.nii.gz'),
        'root': root,
    }
    for modality in modalities:
        key = modality.lower()
        assets[f'{key}_zoo'] = write_test_zoo(root / f'zoo-{key}', modality=modality)
    return assets


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth random intensities in about [0, 3] with a little noise, like an MR image."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.rand(shape, generator=generator), 5, 1, 2)
    return 3 * x + 0.1 * torch.rand(shape, generator=generator)


def random_net(**kwargs: Any) -> ResidualUNet3D:
    """A seeded :class:`ResidualUNet3D` in eval mode whose head is random (not zero), so it
    changes its input; ``kwargs`` are its hyperparameters (``levels``, ``initial_filters``)."""
    import torch

    from cahal_bids.engine.networks import ResidualUNet3D

    torch.manual_seed(0)
    return ResidualUNet3D(zero_init_head=False, **kwargs).eval()


def l1_loss(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean absolute error in the ``(loss, logged values)`` form ``fit`` and ``train_zoo`` take."""
    loss = (prediction - target).abs().mean()
    return loss, {'l1': float(loss.detach())}


def run_captured(command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to the end, capturing text output; a failure is returned, not raised."""
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
