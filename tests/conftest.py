"""Shared fixtures: tiny synthetic NIfTI files written into ``tmp_path``.

``make_nifti(...)`` writes a valid image (any shape, voxel sizes, affine, dtype,
NIfTI-1 or NIfTI-2, separate qform/sform) and returns its path;
``patch_nifti_header(path, **fields)`` then rewrites raw header fields in place
(bypassing nibabel's consistency fixes) to make deliberately broken files.
``make_affine(...)`` builds permuted, flipped and oblique affines (session-scoped,
so it can be used inside hypothesis tests).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest


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


@pytest.fixture(scope='session')
def make_affine() -> Callable[..., np.ndarray]:
    """:func:`build_affine`: permuted, flipped, oblique voxel-to-world matrices."""
    return build_affine


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


@pytest.fixture
def make_nifti(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small synthetic NIfTI image into ``tmp_path``; returns its path.

    Arguments (all optional): ``shape`` (default ``(8, 9, 10)``; ignored when
    ``data`` is given), ``zooms`` (default ``(1, 1, 3)``, used when ``affine`` is
    None to build a centred RAS affine), ``affine``, ``data`` (default:
    reproducible uniform noise in [0, 100)), ``name`` (``'img.nii.gz'``; the
    extension chooses compression), ``dtype`` (on-disk type, default float32),
    ``nifti2``, ``qform_affine`` (default ``affine``), ``qform_code`` and
    ``sform_code`` (default 1; 0 leaves that transform unset), ``header_edits``
    (raw fields patched after writing, see :func:`patch_nifti_header`) and
    ``folder`` (default ``tmp_path``).
    """

    def _make(
        shape: Sequence[int] = (8, 9, 10),
        zooms: Sequence[float] = (1.0, 1.0, 3.0),
        affine: npt.ArrayLike | None = None,
        data: npt.ArrayLike | None = None,
        name: str = 'img.nii.gz',
        *,
        dtype: npt.DTypeLike = np.float32,
        nifti2: bool = False,
        qform_affine: npt.ArrayLike | None = None,
        qform_code: int = 1,
        sform_code: int = 1,
        header_edits: dict[str, Any] | None = None,
        folder: Path | None = None,
    ) -> Path:
        if data is None:
            rng = np.random.default_rng(0)
            array = (rng.random(tuple(shape)) * 100).astype(dtype)
        else:
            array = np.asarray(data)
            if array.dtype.fields is None:
                array = array.astype(dtype)
        shape = array.shape
        if affine is None:
            matrix = centred_affine((*shape, 1, 1, 1)[:3], zooms)
        else:
            matrix = np.asarray(affine, dtype=float)
        image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        image = image_class(array, matrix)
        image.header.set_data_dtype(array.dtype)
        image.set_sform(matrix, code=sform_code)
        image.set_qform(
            matrix if qform_affine is None else np.asarray(qform_affine), code=qform_code
        )
        image.header.set_xyzt_units(xyz='mm')
        path = (tmp_path if folder is None else folder) / name
        nib.save(image, path)
        if header_edits:
            patch_nifti_header(path, **header_edits)
        return path

    return _make


@pytest.fixture
def patch_header() -> Callable[..., Path]:
    """:func:`patch_nifti_header` as a fixture (tests cannot import conftest)."""
    return patch_nifti_header


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


@pytest.fixture
def test_zoo(tmp_path: Path) -> Path:
    """A T1w zoo of random tiny experts for every cell."""
    return write_test_zoo(tmp_path / 'zoo')


SHARED_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
"""``../shared/data`` beside the repository: real scans, present on CI."""


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'{SHARED_DATA} is absent')
    return SHARED_DATA


@pytest.fixture
def make_zoo(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_zoo('name', cells=..., head_scale=...)`` writes a tiny test zoo."""

    def _make(name: str = 'zoo', **options: Any) -> Path:
        return write_test_zoo(tmp_path / name, **options)

    return _make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread: tiny convolutions run ~10x faster so on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def head_phantom(shape: Sequence[int], voxel_sizes: Sequence[float], *, seed: int = 0):
    """A smooth head-like volume: bright scalp shell, grey 'brain', darker 'ventricles'.

    Built in millimetres around the grid centre, so the same anatomy can be sampled
    on grids of any resolution (a template at 1 mm, thick-slice inputs).
    """
    import numpy as np
    from scipy import ndimage

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
    import json

    import nibabel as nib
    import numpy as np

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
    import nibabel as nib
    import numpy as np

    shape = (80, 92, 72)
    data = head_phantom(shape, (1.0, 1.0, 1.0), seed=99)
    data = np.asarray(
        __import__('scipy').ndimage.zoom(data, 1.05, order=1)[: shape[0], : shape[1], : shape[2]]
    )
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(data.shape) - 1) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(data.astype(np.float32), affine).to_filename(path)
    return path


@pytest.fixture(scope='session')
def dataset_factories() -> dict[str, Callable[..., Path]]:
    """:func:`write_bids_dataset`, :func:`write_phantom_template` and :func:`write_test_zoo`
    for module-scoped fixtures (tests cannot import conftest)."""
    return {
        'bids': write_bids_dataset,
        'template': write_phantom_template,
        'zoo': write_test_zoo,
    }
