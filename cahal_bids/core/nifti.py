"""Load, validate and atomically save NIfTI images, from files or in memory.

Every problem with an input image is reported as one
:class:`~cahal_bids.core.errors.InvalidImageError` whose message starts with the file
name (``<in-memory image>`` for :func:`validate_image`), so a one-line report is enough
to find the culprit. Problems that do not stop processing (qform and sform disagreeing,
no orientation at all, header pixdim disagreeing with the affine) are returned as
human-readable strings in ``warnings``.

Which affine is used (the rule of :func:`choose_affine`, the same as NIfTI's and
nibabel's):

1. ``sform_code > 0``: the sform. If the qform is also set and the two differ by
   more than :data:`QFORM_SFORM_TOLERANCE` (largest absolute difference of the
   top three rows: millimetres for the translation, mm per voxel for the
   rotation-zoom part), a warning names the difference.
2. otherwise ``qform_code > 0``: the qform.
3. otherwise nibabel's fallback (pixdim scaling about the array centre) and a
   warning that the orientation is unknown.

Voxel sizes are the column norms of that affine's 3x3 part: the spacing that is
actually used, which is not always ``pixdim[1:4]``.

>>> affine, warnings = choose_affine(nib.Nifti1Header(), 'x.nii')
>>> print(warnings[0])
x.nii: neither qform nor sform is set (both codes 0): orientation unknown, using pixdim only
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import Opener
from nibabel.spatialimages import HeaderDataError, ImageDataError

from cahal_bids.core.atomic import atomic_path
from cahal_bids.core.errors import InvalidImageError
from cahal_bids.core.memory import available_system_memory_bytes

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    'NIFTI_SUFFIXES',
    'nifti_stem',
    'QFORM_SFORM_TOLERANCE',
    'SINGULAR_TOLERANCE',
    'LoadedHeader',
    'LoadedImage',
    'choose_affine',
    'load_header',
    'load_image',
    'nifti_image',
    'save_image',
    'validate_image',
    'write_image',
]

NIFTI_SUFFIXES: tuple[str, ...] = ('.nii', '.nii.gz')
"""File name endings accepted for reading and writing (NIfTI-1 or NIfTI-2 single file)."""

QFORM_SFORM_TOLERANCE = 1e-3
"""Largest tolerated difference (mm, or mm per voxel) between qform and sform."""

SINGULAR_TOLERANCE = 1e-6
"""An affine is singular when ``|det| <= SINGULAR_TOLERANCE * prod(column norms)``."""

_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    ImageDataError,
    OSError,
    EOFError,
    zlib.error,
    ValueError,
)
"""What nibabel and the decompressors raise for files that are not valid NIfTI."""


@dataclass(frozen=True, eq=False)
class LoadedHeader:
    """A validated NIfTI header, without voxel data (for dry runs and routing).

    ``shape`` is always 3D: a 4D image with a single volume is reported with the
    volume axis dropped. ``affine`` is a read-only 4x4 float64 copy. ``path`` is None
    for an image validated in memory (:func:`validate_image`).
    """

    path: Path | None
    affine: np.ndarray
    header: nib.Nifti1Header
    voxel_sizes: tuple[float, float, float]
    shape: tuple[int, int, int]
    warnings: tuple[str, ...]
    source_dtype: str


@dataclass(frozen=True, eq=False)
class LoadedImage(LoadedHeader):
    """A validated NIfTI image: :class:`LoadedHeader` plus its voxels.

    ``data`` is a C-contiguous float32 array of shape ``shape`` with every value
    finite, scaled by ``scl_slope``/``scl_inter`` where the header sets them. It
    is an ordinary writable array owned by this object (no memory map).
    """

    data: np.ndarray


def _is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | PathLike[str]) -> str:
    """The file name without its NIfTI suffix (``.nii.gz`` or ``.nii``, any case).

    Nipype's ``split_filename`` does the same for the app's interfaces, but the core
    layer does not import Nipype (``cahal-enhance`` and the engine run without it), so
    this is the one definition the package uses.

    >>> nifti_stem('/data/sub-01_T1w.nii.gz'), nifti_stem('a.NII'), nifti_stem('b.txt')
    ('sub-01_T1w', 'a', 'b.txt')
    """
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _name(path: str | PathLike[str] | None) -> str:
    """How messages name an image: its file, or ``<in-memory image>``."""
    return '<in-memory image>' if path is None else str(path)


def _check_file(path: Path) -> None:
    """Refuse missing, unreadable, empty and wrongly named files before nibabel sees them."""
    if not _is_nifti_name(path):
        raise InvalidImageError(
            path, f'unsupported file name; expected one ending in {" or ".join(NIFTI_SUFFIXES)}'
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidImageError(path, 'file not found') from None
    except OSError as exc:
        raise InvalidImageError(path, f'cannot access file ({exc.strerror})') from None
    if path.is_dir():
        raise InvalidImageError(path, 'is a directory, not a NIfTI file')
    try:
        with open(path, 'rb') as stream:
            stream.read(1)
    except PermissionError:
        raise InvalidImageError(path, 'permission denied (file is not readable)') from None
    except OSError as exc:
        raise InvalidImageError(path, f'cannot open file ({exc.strerror})') from None
    if size == 0:
        raise InvalidImageError(path, 'empty file (0 bytes)')


def _max_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.max(np.abs(first[:3] - second[:3])))


def choose_affine(
    header: nib.Nifti1Header, path: str | PathLike[str] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The voxel-to-world affine to use for ``header`` and the warnings it raises.

    See the module docstring for the rule. ``path`` only names the file in the
    warnings. Raises :class:`~cahal_bids.core.errors.InvalidImageError` when the
    header's qform or sform cannot be decoded.
    """
    name = _name(path)
    try:
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
        if sform_code > 0:
            if qform_code > 0:
                difference = _max_difference(np.asarray(sform), np.asarray(qform))
                if not difference <= QFORM_SFORM_TOLERANCE:
                    return np.asarray(sform, dtype=np.float64), (
                        f'{name}: qform and sform differ by up to {difference:.4g} mm '
                        f'(tolerance {QFORM_SFORM_TOLERANCE:g}); using the sform '
                        f'(sform_code={int(sform_code)}, qform_code={int(qform_code)})',
                    )
            return np.asarray(sform, dtype=np.float64), ()
        if qform_code > 0:
            return np.asarray(qform, dtype=np.float64), ()
        fallback = np.asarray(header.get_base_affine(), dtype=np.float64)
    except (HeaderDataError, ValueError) as exc:  # e.g. a quaternion that is not a rotation
        raise InvalidImageError(path, f'invalid qform/sform in header ({exc})') from None
    return fallback, (
        f'{name}: neither qform nor sform is set (both codes 0): orientation unknown, '
        'using pixdim only',
    )


def _validated_shape(path: Path | None, raw_shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(int(size) for size in raw_shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) == 4:
        raise InvalidImageError(
            path, f'4D image with {shape[3]} volumes (shape {shape}); expected a single 3D volume'
        )
    elif len(shape) != 3:
        raise InvalidImageError(path, f'{len(shape)}D image (shape {shape}); expected a 3D volume')
    if min(shape) < 2:
        axis = int(np.argmin(shape))
        raise InvalidImageError(
            path, f'fewer than 2 voxels along axis {axis} (shape {shape}); expected a 3D volume'
        )
    return shape[0], shape[1], shape[2]


def _validated_dtype(path: Path | None, header: nib.Nifti1Header) -> np.dtype[Any]:
    dtype = header.get_data_dtype()
    if dtype.fields is not None:
        raise InvalidImageError(
            path,
            f'structured (RGB/RGBA) voxel type {dtype.name} is not supported; '
            'expected scalar intensities',
        )
    if dtype.kind == 'c':
        raise InvalidImageError(
            path, f'complex voxel type {dtype.name} is not supported; expected real intensities'
        )
    if dtype.kind not in 'uif':
        raise InvalidImageError(path, f'unsupported voxel type {dtype.name}')
    return dtype


def _raw_pixdim(path: Path, header: nib.Nifti1Header) -> np.ndarray:
    """pixdim[1:4] as stored: nibabel silently replaces zero and negative ones when loading."""
    try:
        with Opener(path) as stream:
            raw = type(header).from_fileobj(stream, check=False)
    except _READ_ERRORS as exc:
        raise InvalidImageError(
            path, f'not a readable NIfTI file ({_reason(exc, path)})'
        ) from None
    return np.asarray(raw['pixdim'][1:4], dtype=np.float64)


def _validated_geometry(
    path: Path | None, header: nib.Nifti1Header, pixdim: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float], tuple[str, ...]]:
    """The affine, voxel sizes and warnings of ``header``; ``pixdim`` is pixdim[1:4] as stored."""
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        raise InvalidImageError(
            path, f'header voxel sizes pixdim[1:4] = {pixdim.tolist()} must be finite and > 0'
        )
    affine, warnings = choose_affine(header, path)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidImageError(path, f'non-finite affine {affine[:3].tolist()}')
    norms = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    if not np.all(norms > 0):
        raise InvalidImageError(
            path, f'affine voxel sizes (column norms) {norms.tolist()} must be > 0'
        )
    determinant = abs(float(np.linalg.det(affine[:3, :3])))
    if determinant <= SINGULAR_TOLERANCE * float(np.prod(norms)):
        raise InvalidImageError(
            path,
            f'singular affine (|det| = {determinant:.3g} for voxel sizes '
            f'{np.round(norms, 6).tolist()}): {affine[:3].tolist()}',
        )
    if np.max(np.abs(norms - pixdim)) > QFORM_SFORM_TOLERANCE:
        warnings = (
            *warnings,
            f'{_name(path)}: header pixdim {np.round(pixdim, 6).tolist()} differs from the '
            f'affine voxel sizes {np.round(norms, 6).tolist()}; using the affine',
        )
    affine = affine.copy()
    affine.setflags(write=False)
    voxel_sizes = (float(norms[0]), float(norms[1]), float(norms[2]))
    return affine, voxel_sizes, warnings


def _as_nifti(image: object, path: Path | None) -> nib.Nifti1Image:
    """``image`` itself when it is a NIfTI-1 or NIfTI-2 image; any other type raises."""
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        read_as = 'got' if path is None else 'read as'
        raise InvalidImageError(
            path, f'not a single-file NIfTI-1/NIfTI-2 image ({read_as} {type(image).__name__})'
        )
    return image


def _validated_header(
    image: nib.Nifti1Image, path: Path | None, pixdim: np.ndarray
) -> LoadedHeader:
    """Every check of a NIfTI image's header and shape, for files and in-memory images.

    ``pixdim`` is pixdim[1:4] as stored (nibabel replaces zero and negative ones when
    it reads a file, so a file's are read again from its bytes).
    """
    header = image.header
    shape = _validated_shape(path, image.shape)
    dtype = _validated_dtype(path, header)
    affine, voxel_sizes, warnings = _validated_geometry(path, header, pixdim)
    return LoadedHeader(
        path=path,
        affine=affine,
        header=header,
        voxel_sizes=voxel_sizes,
        shape=shape,
        warnings=warnings,
        source_dtype=dtype.name,
    )


def _open(path: str | PathLike[str]) -> tuple[nib.Nifti1Image, LoadedHeader]:
    file = Path(path)
    _check_file(file)
    try:
        image = nib.load(file, mmap=False)
    except _READ_ERRORS as exc:
        raise InvalidImageError(
            file, f'not a readable NIfTI file ({_reason(exc, file)})'
        ) from None
    nifti = _as_nifti(image, file)
    loaded = _validated_header(nifti, file, _raw_pixdim(file, nifti.header))
    if not file.name.lower().endswith('.gz'):
        _check_size(file, loaded.header, np.dtype(loaded.source_dtype))
    return nifti, loaded


def _check_size(path: Path, header: nib.Nifti1Header, dtype: np.dtype[Any]) -> None:
    """An uncompressed file must hold every voxel; checked without reading them."""
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * int(
        dtype.itemsize
    )
    actual = path.stat().st_size
    if actual < expected:
        raise InvalidImageError(
            path, f'truncated file: {actual} bytes, header promises at least {expected}'
        )


def _reason(exc: BaseException, path: Path | None) -> str:
    """One-line reason from a reader exception, without repeating the file name."""
    text = str(exc)
    if path is not None:
        text = text.replace(f'"{path}"', 'file').replace(str(path), 'file')
    text = ' '.join(text.split())
    text = text or 'no details'
    return f'{type(exc).__name__}: {text}'


def load_header(path: str | PathLike[str]) -> LoadedHeader:
    """Validate the file and header of a NIfTI image without reading its voxels.

    Everything :func:`load_image` checks is checked here except the voxel values
    themselves (NaN/Inf) and, for ``.nii.gz``, truncation of the voxel data, which
    only decompression reveals. Uncompressed files are checked to be long enough.
    """
    return _open(path)[1]


def _check_fits_in_memory(loaded: LoadedHeader) -> None:
    """Refuse, from the header alone, an image whose voxels cannot be held in memory.

    Reading needs the file's own values and their float32 copy; half of the available
    memory is the most one image may take, so the machine is never driven out of memory.
    """
    voxels = int(np.prod(loaded.shape))
    needed = voxels * (4 + np.dtype(loaded.source_dtype).itemsize)
    available = available_system_memory_bytes()
    if available is not None and needed > available // 2:
        raise InvalidImageError(
            loaded.path,
            f'too large: {voxels} voxels need about {needed / 2**30:.1f} GiB to read, '
            f'{available / 2**30:.1f} GiB of memory is available',
        )


def load_image(path: str | PathLike[str]) -> LoadedImage:
    """Load and validate a 3D NIfTI-1/NIfTI-2 image as float32 (see :class:`LoadedImage`).

    Raises :class:`~cahal_bids.core.errors.InvalidImageError` naming the file and the
    problem for every image that cannot be used as it is.
    """
    return _with_voxels(*_open(path))


def validate_image(image: nib.Nifti1Image) -> LoadedImage:
    """Validate an in-memory NIfTI-1/NIfTI-2 image as :func:`load_image` validates a file.

    The header that is checked is the one :func:`nibabel.save` would write, as
    :func:`nibabel.load` would read it back: a copy of ``image.header`` brought in line
    with ``image.affine`` and the data shape (the image itself is not changed); its
    pixdim[1:4] are checked as stored in ``image.header``, before nibabel's fixes. Every
    check of :func:`load_image` on the header, shape, voxel type, geometry and voxel
    values applies; the checks of the file itself (name, size, truncation) have nothing
    to check. Raises :class:`~cahal_bids.core.errors.InvalidImageError` (its message
    starts with ``<in-memory image>``).

    >>> image = nib.Nifti1Image(np.ones((4, 5, 6), np.int16), np.diag([1, 1, 4, 1]))
    >>> validate_image(image).voxel_sizes, validate_image(image).data.dtype
    ((1.0, 1.0, 4.0), dtype('float32'))
    """
    image = _as_nifti(image, None)
    try:
        twin = type(image)(image.dataobj, image.affine, image.header)
        twin.update_header()
    except _READ_ERRORS as exc:
        raise InvalidImageError(None, f'invalid header ({_reason(exc, None)})') from None
    pixdim = np.asarray(image.header['pixdim'][1:4], dtype=np.float64)
    return _with_voxels(twin, _validated_header(twin, None, pixdim))


def _with_voxels(image: nib.Nifti1Image, loaded: LoadedHeader) -> LoadedImage:
    """Read the voxels of a validated image as finite float32 (see :class:`LoadedImage`)."""
    _check_fits_in_memory(loaded)
    try:
        data = np.asanyarray(image.dataobj, dtype=np.float32)
    except _READ_ERRORS as exc:
        raise InvalidImageError(
            loaded.path, f'truncated or corrupt voxel data ({_reason(exc, loaded.path)})'
        ) from None
    data = np.ascontiguousarray(np.asarray(data).reshape(loaded.shape))
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InvalidImageError(
            loaded.path,
            f'{bad} of {data.size} voxels are NaN or infinite (after scaling to float32)',
        )
    return LoadedImage(
        path=loaded.path,
        affine=loaded.affine,
        header=loaded.header,
        voxel_sizes=loaded.voxel_sizes,
        shape=loaded.shape,
        warnings=loaded.warnings,
        source_dtype=loaded.source_dtype,
        data=data,
    )


def _prepare_data(data: npt.ArrayLike, dtype: npt.DTypeLike, path: Path | None) -> np.ndarray:
    array = np.asarray(data)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    target = np.dtype(dtype)
    if array.ndim not in (3, 4):
        raise InvalidImageError(
            path, f'cannot save an array of shape {array.shape}; expected 3D (or 4D)'
        )
    if target.kind in 'ui':
        if array.dtype.kind == 'f' and not np.all(np.isfinite(array)):
            raise InvalidImageError(path, f'cannot save NaN or infinite values as {target.name}')
        info = np.iinfo(target)
        if array.dtype.kind == 'f':
            array = np.rint(array)
        return np.clip(array, info.min, info.max).astype(target)
    if target.kind == 'f':
        return array.astype(target)
    raise InvalidImageError(path, f'cannot save voxel type {target.name}; expected int or float')


def nifti_image(
    data: npt.ArrayLike,
    affine: npt.ArrayLike,
    *,
    dtype: npt.DTypeLike = np.float32,
    header_like: nib.Nifti1Header | LoadedHeader | None = None,
) -> nib.Nifti1Image:
    """The in-memory image that :func:`save_image` writes for the same arguments."""
    return _build_image(data, affine, dtype, header_like, None)


def _build_image(
    data: npt.ArrayLike,
    affine: npt.ArrayLike,
    dtype: npt.DTypeLike,
    header_like: nib.Nifti1Header | LoadedHeader | None,
    path: Path | None,
) -> nib.Nifti1Image:
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise InvalidImageError(path, f'cannot save with affine {matrix.tolist()}')
    array = _prepare_data(data, dtype, path)

    qform_code = sform_code = 1
    if header_like is not None:
        like = header_like.header if isinstance(header_like, LoadedHeader) else header_like
        qform_code = int(like['qform_code']) or 1
        sform_code = int(like['sform_code']) or 1
    image = nib.Nifti1Image(array, matrix, dtype=array.dtype)
    image.set_qform(matrix, code=qform_code)
    image.set_sform(matrix, code=sform_code)
    image.header.set_xyzt_units(xyz='mm')
    return image


def _checked_name(path: str | PathLike[str]) -> Path:
    file = Path(path)
    if not _is_nifti_name(file):
        raise InvalidImageError(
            file, f'unsupported file name; expected one ending in {" or ".join(NIFTI_SUFFIXES)}'
        )
    return file


def save_image(
    data: npt.ArrayLike,
    affine: npt.ArrayLike,
    path: str | PathLike[str],
    *,
    dtype: npt.DTypeLike = np.float32,
    header_like: nib.Nifti1Header | LoadedHeader | None = None,
) -> Path:
    """Write ``data`` (3D or 4D array-like; a CPU tensor works) to ``path`` atomically.

    The image is written to a hidden temporary file in the destination folder and
    moved over ``path`` with :func:`os.replace`, so ``path`` is either absent or
    unchanged (on error) or complete. qform and sform are both set to ``affine``,
    with code 1 (scanner) or the corresponding code of ``header_like`` when that is
    > 0; spatial units are millimetres. Nothing else is copied from
    ``header_like`` (slice timing and scaling would be wrong on a new grid).
    Integer ``dtype`` rounds and clips the values, so no scaling is stored; note
    that NIfTI stores the sform in float32. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    file = _checked_name(path)
    return write_image(_build_image(data, affine, dtype, header_like, file), file)


def write_image(image: nib.Nifti1Image, path: str | PathLike[str]) -> Path:
    """Write an in-memory NIfTI image to ``path`` atomically, as :func:`save_image` does.

    ``.nii.gz`` is gzip-compressed with a fixed gzip header, so equal images give equal
    bytes. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    file = _checked_name(path)
    with atomic_path(file) as temporary:
        _write_nifti(image, temporary, compressed=file.name.endswith('.gz'))
    return file


def _write_nifti(image: nib.Nifti1Image, path: Path, *, compressed: bool) -> None:
    """Write ``image`` as one file; gzip with ISA-L when available (about 5x faster).

    The gzip header carries no name and a zero time stamp, so equal images give equal
    bytes.
    """
    payload = image.to_bytes()
    with open(path, 'wb') as stream:
        if not compressed:
            stream.write(payload)
            return
        try:
            from isal.igzip import IGzipFile as GzipWriter

            level = 2
        except ImportError:  # pragma: no cover - isal is a dependency, but optional here
            from gzip import GzipFile as GzipWriter  # type: ignore[assignment]

            level = 1
        with GzipWriter(
            filename='', mode='wb', compresslevel=level, fileobj=stream, mtime=0
        ) as gz:
            gz.write(payload)
