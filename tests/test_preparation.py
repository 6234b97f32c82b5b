"""Ground-truth preparation (cahal_bids.training.preparation) and ``cahal-train prepare``.

The unit tests run the whole pipeline (ANTs included) on small synthetic
three-tissue phantoms defined in world coordinates, so the true tissue of every
output voxel is known wherever the grid lies.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cahal_bids.cli.train_prepare import add_prepare_arguments, run_prepare
from cahal_bids.core.errors import InvalidImageError
from cahal_bids.core.grid import native_grid
from cahal_bids.core.normalization import DEFAULT_NORMALIZATION, RobustScale
from cahal_bids.core.orientation import Reorientation
from cahal_bids.training import preparation
from cahal_bids.training.preparation import (
    BrainTemplate,
    PreparationError,
    PreparedVolume,
    antialias_sigmas,
    find_images,
    prepare_dataset,
    prepare_image,
)

from helpers import SHARED_DATA

# Semi-axes (mm) of nested ellipsoids centred at the world origin: white matter
# inside grey matter inside a CSF layer, with CSF ventricles in the white matter.
WM_AXES = (11.0, 13.0, 9.0)
GM_AXES = (15.0, 17.5, 13.0)
CSF_AXES = (18.0, 20.5, 16.0)
VENTRICLE_AXES = (3.0, 5.0, 2.5)
SKULL_AXES = (21.0, 23.5, 19.0)
SCALP_AXES = (24.0, 26.5, 22.0)
T1W_INTENSITY = {1: 30.0, 2: 65.0, 3: 100.0}
SKULL_INTENSITY = 5.0
SCALP_INTENSITY = 85.0


def _inside(points: np.ndarray, axes: tuple[float, float, float], shift=(0.0, 0.0, 0.0)):
    scaled = (points - np.asarray(shift)) / np.asarray(axes)
    return np.sum(scaled**2, axis=-1) <= 1.0


def true_tissue(points: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Tissue label (0 background, 1 CSF, 2 GM, 3 WM) of world points (..., 3)."""
    labels = np.zeros(points.shape[:-1], dtype=np.uint8)
    labels[_inside(points, CSF_AXES, shift)] = 1
    labels[_inside(points, GM_AXES, shift)] = 2
    labels[_inside(points, WM_AXES, shift)] = 3
    labels[_inside(points, VENTRICLE_AXES, shift)] = 1
    return labels


def _world_points(shape, affine) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), axis=-1)
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def phantom(shape, affine, *, full_head=False, noise=2.0, seed=0, shift=(0.0, 0.0, 0.0)):
    """T1w-like phantom sampled at voxel centres (3x supersampled along each axis)."""
    rng = np.random.default_rng(seed)
    affine = np.asarray(affine, dtype=float)
    total = np.zeros(shape, dtype=np.float64)
    offsets = (np.arange(3) + 0.5) / 3 - 0.5
    for dx in offsets:
        for dy in offsets:
            for dz in offsets:
                index = np.stack(
                    np.meshgrid(
                        *[np.arange(n) + d for n, d in zip(shape, (dx, dy, dz), strict=True)],
                        indexing='ij',
                    ),
                    axis=-1,
                )
                points = index @ affine[:3, :3].T + affine[:3, 3]
                values = np.zeros(shape)
                if full_head:
                    values[_inside(points, SCALP_AXES, shift)] = SCALP_INTENSITY
                    values[_inside(points, SKULL_AXES, shift)] = SKULL_INTENSITY
                labels = true_tissue(points, shift)
                for label, intensity in T1W_INTENSITY.items():
                    values[labels == label] = intensity
                total += values
    clean = total / offsets.size**3
    if full_head:
        noisy = np.hypot(clean + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
        return noisy.astype(np.float32)
    inside = clean > 0
    noisy = np.abs(clean + rng.normal(0, noise, shape)) * inside
    return noisy.astype(np.float32)


def _rotation(axis, degrees):
    unit = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -unit[2], unit[1]], [unit[2], 0, -unit[0]], [-unit[1], unit[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def centred_affine(shape, zooms, *, signs=(-1, -1, 1), degrees=15.0):
    """Flipped (LPS by default) and oblique affine whose field of view is centred on 0."""
    linear = _rotation((1, 2, 3), degrees) @ np.diag(np.asarray(signs) * np.asarray(zooms))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz='mm')
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return 2.0 * float(np.sum(first & second)) / float(first.sum() + second.sum())


@pytest.fixture(scope='module')
def skull_stripped(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A skull-stripped T1w phantom, 1.2 mm LPS oblique, 42^3 voxels."""
    shape, zooms = (42, 42, 42), (1.2, 1.2, 1.2)
    affine = centred_affine(shape, zooms)
    path = tmp_path_factory.mktemp('phantom') / 'sub-01_T1w.nii.gz'
    return write(path, phantom(shape, affine), affine), affine


@pytest.fixture(scope='module')
def prepared(skull_stripped, tmp_path_factory) -> PreparedVolume:
    path, _ = skull_stripped
    return prepare_image(path, tmp_path_factory.mktemp('cache'), modality='T1w')


# --- pure helpers ------------------------------------------------------------------------


def test_antialias_sigmas():
    assert antialias_sigmas((1.0, 1.3, 3.0)) == (0.0, 0.0, 0.0)
    sigma = antialias_sigmas((0.67, 0.67, 0.7))
    # The Gaussian brings a FWHM of r up to a FWHM of 1 mm: r^2 + (2.3548 s r)^2 = 1.
    for s, r in zip(sigma, (0.67, 0.67, 0.7), strict=True):
        assert r**2 + (2 * np.sqrt(2 * np.log(2)) * s * r) ** 2 == pytest.approx(1.0)


def test_resample_matches_the_native_grid_and_keeps_a_linear_ramp(make_affine):
    affine = make_affine((0.8, 1.25, 2.0), (1, 2, 0), (-1, 1, -1), 20.0, (1, 2, 3), (4, -7, 9))
    shape = (30, 22, 14)
    points = _world_points(shape, affine)
    ramp = (points @ np.array([0.3, -0.2, 0.5]) + 50).astype(np.float32)
    out, grid = preparation.resample_to_native_bspline(ramp, affine, antialias=False)
    expected = native_grid(shape, affine)
    assert grid.shape == expected.shape == out.shape
    np.testing.assert_allclose(grid.affine, expected.affine)
    truth = _world_points(grid.shape, grid.affine) @ np.array([0.3, -0.2, 0.5]) + 50
    interior = (slice(6, -6),) * 3
    np.testing.assert_allclose(out[interior], truth[interior], atol=5e-3)


def test_head_mask_and_brain_extraction_detection(skull_stripped):
    path, affine = skull_stripped
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    head = preparation.estimate_head_mask(data, (1.2, 1.2, 1.2))
    truth = true_tissue(_world_points(data.shape, affine)) > 0
    # Smoothing by 1 mm makes the mask slightly generous, never short.
    assert np.all(head[truth]) and head.sum() < 1.25 * truth.sum()
    extracted, evidence = preparation.looks_brain_extracted(data, head, (1.2, 1.2, 1.2))
    assert extracted and evidence['outside_zero_fraction'] > 0.99
    # The same brain inside a noisy background is not skull-stripped.
    noisy = data + np.abs(np.random.default_rng(1).normal(0, 2, data.shape)).astype(np.float32)
    assert not preparation.looks_brain_extracted(noisy, head, (1.2, 1.2, 1.2))[0]


# --- the pipeline on a skull-stripped phantom --------------------------------------------


def test_output_is_on_the_native_grid_in_ras(skull_stripped, prepared):
    path, affine = skull_stripped
    grid = native_grid((42, 42, 42), affine)
    reorientation = Reorientation.from_affine(grid.affine, grid.shape)
    image = nib.load(prepared.image_path)
    assert image.shape == reorientation.ras_shape
    np.testing.assert_allclose(image.affine, reorientation.ras_affine, atol=1e-4)
    assert nib.aff2axcodes(image.affine) == ('R', 'A', 'S')
    # The outer corner of the field of view is the grid's, whichever voxel holds it.
    corners = np.array(
        np.meshgrid(
            [-0.5, image.shape[0] - 0.5],
            [-0.5, image.shape[1] - 0.5],
            [-0.5, image.shape[2] - 0.5],
            indexing='ij',
        )
    ).reshape(3, -1)
    world = image.affine[:3, :3] @ corners + image.affine[:3, 3:4]
    distances = np.linalg.norm(world - grid.corner[:, None], axis=0)
    assert distances.min() < 1e-3
    for loader in (prepared.labels, prepared.head_mask, prepared.brain_mask):
        assert loader().shape == image.shape
    assert prepared.labels().dtype == np.uint8
    assert prepared.metadata['source_orientation'] == 'LPS'


def test_image_is_normalised_with_robust_scale(prepared):
    image = prepared.image()
    assert image.dtype == np.float32 and image.min() >= 0
    refit = RobustScale.from_config(DEFAULT_NORMALIZATION, image)
    assert refit.scale == pytest.approx(1.0, rel=1e-5)
    scale = prepared.scale
    assert prepared.metadata['normalization']['percentile'] == DEFAULT_NORMALIZATION['percentile']
    assert 85 < scale < 115  # the white-matter level (100) after denoising


def test_labels_follow_the_phantom_tissues(prepared):
    labels = prepared.labels()
    truth = true_tissue(_world_points(labels.shape, prepared.affine))
    for tissue in (1, 2, 3):
        assert dice(labels == tissue, truth == tissue) > 0.8, preparation.LABELS[tissue]
    means = prepared.metadata['label_intensity_means']
    assert means['CSF'] < means['GM'] < means['WM']
    assert prepared.metadata['brain_extracted']['value'] is True
    assert dice(prepared.brain_mask(), truth > 0) > 0.9
    assert np.all(labels[~prepared.brain_mask()] == 0)


def test_metadata_records_provenance(prepared, skull_stripped):
    metadata = json.loads(prepared.metadata_path.read_text())
    assert metadata['source'] == str(skull_stripped[0].resolve())
    assert len(metadata['source_sha256']) == 64
    assert metadata['parameters']['modality'] == 'T1w'
    assert set(metadata['volumes_ml']) >= {'head', 'brain', 'CSF', 'GM', 'WM'}
    assert metadata['timings_s']['total'] > 0
    assert 'antspyx' in metadata['software']


def test_cache_hit_does_not_recompute(skull_stripped, tmp_path, monkeypatch):
    path, _ = skull_stripped
    calls = []
    real = preparation.nlm_denoise

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(preparation, 'nlm_denoise', counting)
    first = prepare_image(path, tmp_path, modality='T1w', shrink_factor=2)
    assert len(calls) == 1
    stamp = first.image_path.stat().st_mtime_ns
    second = prepare_image(path, tmp_path, modality='T1w', shrink_factor=2)
    assert len(calls) == 1
    assert second.image_path.stat().st_mtime_ns == stamp
    assert second.metadata == first.metadata
    assert second.from_cache and not first.from_cache
    # Other parameters, or a lost file, mean a new preparation.
    prepare_image(path, tmp_path, modality='T1w', shrink_factor=2, seed=3)
    assert len(calls) == 2
    second.labels_path.unlink()
    prepare_image(path, tmp_path, modality='T1w', shrink_factor=2, seed=3)
    assert len(calls) == 3


def test_finer_than_one_millimetre_input_is_antialiased(tmp_path):
    shape, zooms = (64, 64, 58), (0.7, 0.7, 0.8)
    affine = centred_affine(shape, zooms, signs=(1, 1, 1), degrees=-10.0)
    path = write(tmp_path / 'sub-02_T1w.nii.gz', phantom(shape, affine, noise=1.0), affine)
    result = prepare_image(path, tmp_path / 'cache', modality='T1w', denoise=False)
    grid = native_grid(shape, affine)
    assert sorted(result.image().shape) == sorted(grid.shape)
    sigmas = result.metadata['grid']['antialias_sigma_voxels']
    assert sigmas[0] == pytest.approx(antialias_sigmas(zooms)[0]) and sigmas[0] > 0
    truth = true_tissue(_world_points(result.image().shape, result.affine))
    labels = result.labels()
    for tissue in (1, 2, 3):
        assert dice(labels == tissue, truth == tissue) > 0.8


def test_full_head_uses_the_template(tmp_path):
    """A full-head phantom, shifted, with the unshifted phantom as template."""
    tpl_shape = (56, 60, 52)
    tpl_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    tpl_affine[:3, 3] = -(np.asarray(tpl_shape) - 1) / 2
    head = write(
        tmp_path / 'tpl_head.nii.gz',
        phantom(tpl_shape, tpl_affine, full_head=True, noise=0.5),
        tpl_affine,
    )
    brain = (true_tissue(_world_points(tpl_shape, tpl_affine)) > 0).astype(np.float32)
    template = BrainTemplate(
        head=head, brain_mask=nib.Nifti1Image(brain, tpl_affine), name='phantom'
    )
    shape, zooms, shift = (46, 50, 44), (1.25, 1.25, 1.25), (2.5, -3.0, 1.5)
    affine = centred_affine(shape, zooms, degrees=8.0)
    data = phantom(shape, affine, full_head=True, shift=shift)
    path = write(tmp_path / 'sub-03_T1w.nii.gz', data, affine)
    result = prepare_image(
        path, tmp_path / 'cache', modality='T1w', template=template, shrink_factor=2
    )
    assert result.metadata['brain_extracted']['value'] is False
    assert result.metadata['parameters']['template'] == 'phantom'
    truth = true_tissue(_world_points(result.image().shape, result.affine), shift)
    # The mask follows the grey-matter hull: the phantom's outer CSF layer is left out.
    hull = _inside(_world_points(result.image().shape, result.affine), GM_AXES, shift)
    assert dice(result.brain_mask(), hull) > 0.85
    assert result.head_mask().sum() > 1.3 * result.brain_mask().sum()
    labels = result.labels()
    assert dice(labels == 3, truth == 3) > 0.8


# --- failures, datasets and the command line ---------------------------------------------


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / 'sub-09_T1w.nii.gz'
    bad.write_bytes(b'not a nifti file at all')
    with pytest.raises(InvalidImageError, match='sub-09_T1w.nii.gz'):
        prepare_image(bad, tmp_path / 'cache', modality='T1w')
    with pytest.raises(ValueError, match='modality'):
        prepare_image(bad, tmp_path / 'cache', modality='PD')


def _bids(root: Path, skull_stripped_path: Path) -> Path:
    for subject in ('a', 'b', 'stroke01', 'philips01', 'arc2265'):
        anat = root / f'sub-{subject}' / 'anat'
        anat.mkdir(parents=True)
        shutil.copy(skull_stripped_path, anat / f'sub-{subject}_T1w.nii.gz')
    (root / 'sub-b' / 'anat' / 'sub-b_T1w.nii.gz').write_bytes(b'broken')
    (root / 'sub-a' / 'anat' / 'sub-a_FLAIR.nii.gz').write_bytes(b'other modality')
    return root


def test_find_images_filters_subjects(tmp_path, skull_stripped):
    root = _bids(tmp_path / 'bids', skull_stripped[0])
    names = [p.name for p in find_images(root, modality='T1w')]
    assert names == ['sub-a_T1w.nii.gz', 'sub-b_T1w.nii.gz']
    assert [p.name for p in find_images(root, modality='T1w', subjects=['sub-a'])] == [
        'sub-a_T1w.nii.gz'
    ]
    # the whole validation split of ../shared/data/hr is left out unless asked for
    assert len(find_images(root, modality='T1w', exclude_subjects=())) == 5
    for validation in ('stroke01', 'philips01', 'sub-arc2265'):
        with pytest.raises(PreparationError, match='both requested and excluded'):
            find_images(root, modality='T1w', subjects=[validation])
    with pytest.raises(PreparationError, match='sub-zz'):
        find_images(root, modality='T1w', subjects=['zz'])


def test_dataset_and_cli_report_failures(tmp_path, skull_stripped, capsys, monkeypatch):
    root = _bids(tmp_path / 'bids', skull_stripped[0])
    cache = tmp_path / 'cache'
    errors = []
    done = prepare_dataset(
        root,
        cache,
        modality='T1w',
        shrink_factor=2,
        on_error=lambda source, exc: errors.append(source.name),
    )
    assert [item.source.name for item in done] == ['sub-a_T1w.nii.gz']
    assert errors == ['sub-b_T1w.nii.gz']
    manifest = json.loads((cache / 'manifest.json').read_text())
    assert [Path(e['source']).name for e in manifest['entries']] == ['sub-a_T1w.nii.gz']
    assert 'sub-b_T1w.nii.gz' in manifest['failed'][0]['source']

    def parse(*argv: str) -> argparse.Namespace:
        return add_prepare_arguments(argparse.ArgumentParser()).parse_args(list(argv))

    capsys.readouterr()
    code = run_prepare(parse(str(root), '--cache-dir', str(cache), '--shrink-factor', '2'))
    captured = capsys.readouterr()
    assert code == 1
    failures = [line for line in captured.err.splitlines() if 'error' in line]
    assert len(failures) == 1 and 'sub-b_T1w.nii.gz' in failures[0]
    assert 'sub-a_T1w.nii.gz' in captured.out and '(cached;' in captured.out
    code = run_prepare(
        parse(str(root), '--cache-dir', str(cache), '--participant-label', 'stroke01')
    )
    assert code == 2 and 'both requested and excluded' in capsys.readouterr().err
    code = run_prepare(parse(str(tmp_path / 'nowhere'), '--cache-dir', str(cache)))
    assert code == 2


# --- one real image ----------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_skull_stripped_t1w(tmp_path):
    source = SHARED_DATA / 'hr' / 'sub-openms07' / 'anat' / 'sub-openms07_T1w.nii.gz'
    if not source.is_file():
        pytest.skip(f'{source} is not available')
    result = prepare_image(source, tmp_path, modality='T1w', shrink_factor=2)
    volumes = result.metadata['volumes_ml']
    assert result.metadata['brain_extracted']['value'] is True
    assert 1000 <= volumes['brain'] <= 1900
    fractions = {tissue: volumes[tissue] / volumes['brain'] for tissue in ('CSF', 'GM', 'WM')}
    assert 0.03 < fractions['CSF'] < 0.35
    assert 0.25 < fractions['GM'] < 0.65
    assert 0.2 < fractions['WM'] < 0.6
    means = result.metadata['label_intensity_means']
    assert means['CSF'] < means['GM'] < means['WM']
