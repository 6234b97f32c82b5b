"""Registration to a template: ITK transforms, the template's brain, skull-stripped
detection, initialisation, the quality measure and determinism (phantoms; the real
template where ../shared/data is present)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cahal_bids.core.errors import PreprocessingError
from cahal_bids.preprocessing import brain_template, registration
from cahal_bids.preprocessing.brain_template import TemplateBrain, brain_extracted_template
from cahal_bids.preprocessing.registration import (
    compose_to_template,
    detect_brain_extracted,
    register_linear,
    register_to_template,
)
from cahal_bids.preprocessing.registration_brain import strip_for_registration
from cahal_bids.preprocessing.registration_quality import (
    brain_mask_in_image,
    normalized_mutual_information,
    registration_quality,
)
from cahal_bids.preprocessing.transforms import (
    TransformFileError,
    compose,
    mask_points,
    mean_displacement,
    read_itk_affine,
    rigid_matrix,
    write_itk_affine,
)


def test_itk_text_round_trip_matches_ants(tmp_path):
    import ants

    transform = ants.create_ants_transform(
        transform_type='AffineTransform',
        precision='double',
        dimension=3,
        matrix=rigid_matrix(12, 0, (0, 0, 0))[:3, :3] * 1.05,
        center=(3.0, -7.0, 11.0),
        translation=(4.0, 5.0, -6.0),
    )
    ants.write_transform(transform, str(tmp_path / 'ants.txt'))
    matrix = read_itk_affine(tmp_path / 'ants.txt')
    for point in [(0.0, 0.0, 0.0), (10.0, -20.0, 30.0), (-50.0, 8.0, 2.5)]:
        expected = ants.apply_ants_transform_to_point(transform, point)
        np.testing.assert_allclose(matrix[:3, :3] @ point + matrix[:3, 3], expected, atol=1e-6)
    write_itk_affine(matrix, tmp_path / 'ours.txt')
    np.testing.assert_allclose(read_itk_affine(tmp_path / 'ours.txt'), matrix, atol=1e-12)
    again = ants.read_transform(str(tmp_path / 'ours.txt'))
    np.testing.assert_allclose(
        ants.apply_ants_transform_to_point(again, (10.0, -20.0, 30.0)),
        ants.apply_ants_transform_to_point(transform, (10.0, -20.0, 30.0)),
        atol=1e-6,
    )


def test_unreadable_transforms_name_the_file(tmp_path):
    bad = tmp_path / 'bad.txt'
    bad.write_text('#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n')
    with pytest.raises(TransformFileError, match='bad.txt'):
        read_itk_affine(bad)
    with pytest.raises(ValueError, match='4 x 4'):
        write_itk_affine(np.eye(3), tmp_path / 'x.txt')


def test_composition_and_displacement():
    flair_to_t1w = rigid_matrix(5, 2, (1.0, 2.0, 0.0))
    t1w_to_template = rigid_matrix(-8, 0, (0.0, -3.0, 4.0))
    points = np.random.default_rng(0).normal(0, 40, (500, 3))
    composed = compose(flair_to_t1w, t1w_to_template)
    # a template point goes to the T1w first, then to the FLAIR
    step = points @ t1w_to_template[:3, :3].T + t1w_to_template[:3, 3]
    expected = step @ flair_to_t1w[:3, :3].T + flair_to_t1w[:3, 3]
    np.testing.assert_allclose(points @ composed[:3, :3].T + composed[:3, 3], expected)
    shift = np.eye(4)
    shift[:3, 3] = [0.0, 3.0, 4.0]
    assert mean_displacement(shift @ composed, composed, points) == pytest.approx(5.0)
    assert mean_displacement(composed, composed, points) == 0.0
    with pytest.raises(ValueError, match='no points'):
        mean_displacement(composed, composed, np.zeros((0, 3)))


def test_mask_points_are_lps_world_coordinates(tmp_path):
    data = np.zeros((4, 5, 6), dtype=np.uint8)
    data[1, 2, 3] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    nib.Nifti1Image(data, affine).to_filename(tmp_path / 'mask.nii.gz')
    np.testing.assert_allclose(mask_points(tmp_path / 'mask.nii.gz'), [[8.0, -24.0, 11.0]])


def test_normalized_mutual_information_orders_alignment():
    rng = np.random.default_rng(0)
    signal = rng.random(20_000)
    assert normalized_mutual_information(signal, signal) == pytest.approx(2.0)
    noisy = signal + rng.normal(0, 0.05, signal.size)
    unrelated = rng.random(signal.size)
    assert normalized_mutual_information(signal, noisy) > 1.2
    assert normalized_mutual_information(signal, unrelated) < 1.02
    with pytest.raises(ValueError, match='same size'):
        normalized_mutual_information(signal, signal[:10])


# --- phantoms -------------------------------------------------------------------------


def _phantom(shape, sizes, *, seed=0, stripped=False, interior=True):
    """The conftest head phantom in millimetres; ``stripped`` zeroes all but the brain;
    ``interior`` adds a ribbon under the brain's edge and a dozen fixed deep structures
    (the same in every phantom), as a brain has, for fits that rely on its interior."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sizes, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing='ij')
    radius = np.sqrt((x / 30) ** 2 + (y / 36) ** 2 + (z / 28) ** 2)
    volume = np.where(radius < 1.0, 60.0, 0.0)
    volume = np.where(radius < 0.85, 100.0, volume)
    if interior:
        volume = np.where((radius > 0.72) & (radius < 0.85), 75.0, volume)
        anatomy = np.random.default_rng(1234)
        for _ in range(12):
            centre = anatomy.uniform(-14, 14, 3)
            half_axes = anatomy.uniform(3, 7, 3)
            offsets = zip((x, y, z), centre, half_axes, strict=True)
            inside = sum(((c - m) / h) ** 2 for c, m, h in offsets)
            volume = np.where(inside < 1, anatomy.uniform(40, 150), volume)
    # an asymmetric 'ventricle' and a bright 'nose' so that orientation is defined
    volume = np.where(np.sqrt(((x - 6) / 6) ** 2 + ((y - 8) / 12) ** 2 + ((z - 6) / 5) ** 2) < 1,
                      30.0, volume)  # fmt: skip
    volume = np.where(np.sqrt((x / 6) ** 2 + ((y - 34) / 6) ** 2 + ((z + 10) / 8) ** 2) < 1,
                      80.0, volume)  # fmt: skip
    volume = ndimage.gaussian_filter(volume, [1.0 / s for s in sizes])
    volume = (volume + rng.normal(0, 1.0, volume.shape)).clip(0)
    if stripped:
        volume = np.where(radius < 0.85, volume, 0.0)
    return volume.astype(np.float32), radius < 0.85


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units('mm', 'sec')
    image.to_filename(path)
    return path


def _centred(shape, sizes) -> np.ndarray:
    affine = np.diag([*sizes, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(sizes)
    return affine


@pytest.fixture(scope='module')
def phantom_template(tmp_path_factory) -> TemplateBrain:
    """A 1 mm phantom template with a known brain mask (no derivation needed)."""
    folder = tmp_path_factory.mktemp('phantom_template')
    shape = (80, 92, 76)
    head, brain = _phantom(shape, (1.0, 1.0, 1.0), seed=5)
    affine = _centred(shape, (1.0, 1.0, 1.0))
    return TemplateBrain(
        name='Phantom',
        head=_save(folder / 'head.nii.gz', head, affine),
        brain=_save(folder / 'brain.nii.gz', np.where(brain, head, 0).astype(np.float32), affine),
        brain_mask=_save(folder / 'mask.nii.gz', brain.astype(np.uint8), affine),
        record={},
    )


def _moving(
    tmp_path, name, *, sizes=(1.0, 1.0, 4.0), world=None, stripped=False, seed=1, interior=True
):
    """A thick-slice phantom placed in the world by ``world`` (its true pose)."""
    extents = (76, 88, 72)
    shape = [int(round(e / s)) for e, s in zip(extents, sizes, strict=True)]
    data, _ = _phantom(shape, sizes, seed=seed, stripped=stripped, interior=interior)
    affine = (np.eye(4) if world is None else world) @ _centred(shape, sizes)
    return _save(tmp_path / name, data, affine)


def _truth_displacement(forward: Path, world: np.ndarray, template: TemplateBrain) -> float:
    """Mean error (mm) of a forward transform whose truth is ``world`` (RAS, image pose)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected = lps @ world @ lps  # a template point (LPS) -> where the image holds it
    points = mask_points(template.brain_mask, step=2)
    return mean_displacement(read_itk_affine(forward), expected, points)


def test_skull_stripped_inputs_are_detected_from_the_image(tmp_path):
    full = _moving(tmp_path, 'full.nii.gz')
    stripped = _moving(tmp_path, 'stripped.nii.gz', stripped=True)
    assert detect_brain_extracted(full)[0] is False
    decision, evidence = detect_brain_extracted(stripped)
    assert decision is True and evidence['outside_zero_fraction'] > 0.95
    # the file name plays no part
    renamed = shutil.copy(stripped, tmp_path / 'sub-01_T1w.nii.gz')
    assert detect_brain_extracted(renamed)[0] is True


@pytest.mark.slow
@pytest.mark.parametrize('stripped', [False, True])
def test_tilted_shifted_thick_slices_register_to_the_phantom_template(
    tmp_path, phantom_template, stripped
):
    world = rigid_matrix(12, 0, (4.0, -6.0, 20.0))  # nodding 12 degrees, 20 mm up
    moving = _moving(tmp_path, 'moving.nii.gz', world=world, stripped=stripped)
    result = register_to_template(
        moving,
        phantom_template,
        forward_path=tmp_path / 'fwd.txt',
        inverse_path=tmp_path / 'inv.txt',
        modality='T1w',
        sloppy=True,
    )
    details = result.as_dict()
    assert details['brain_extracted'] is stripped
    if stripped:
        assert details['fixed'] == 'brain-extracted template, brain mask'
    elif 'skipped' in details['brain_stage']:  # 4 mm slices: the strip may be implausible
        assert details['fixed'] == 'template head, brain mask in the finest affine levels'
    else:  # skull-stripped with the mask the whole-head fit carried over
        assert details['stages'][-2:] == ['Skull-stripping', 'Affine, brain to brain']
    assert details['initialization']['starts'] == 15
    # ANTs' fast presets stop at a quarter of the resolution: a few millimetres; a start in
    # the wrong place ends centimetres away
    assert _truth_displacement(result.forward, world, phantom_template) < 3.0
    assert details['quality']['doubtful'] is False
    assert details['quality']['brain_coverage'] > 0.9


@pytest.mark.slow
def test_full_head_and_skull_stripped_versions_land_together(tmp_path, phantom_template):
    """One head, with and without its skull, registered as cahal-bids registers (full
    schedules; the full head stripped first, then brain to brain): both find the true pose
    and agree (the real validation images: docs/evaluation.md)."""
    template = phantom_template
    world = rigid_matrix(8, 1, (3.0, 5.0, -4.0))
    found = {}
    for stripped in (False, True):
        # 1 mm, as cahal-bids registers the restored image
        moving = _moving(
            tmp_path, f'moving_{stripped}.nii.gz', world=world, stripped=stripped, sizes=(1, 1, 1)
        )
        result = register_to_template(
            moving,
            template,
            forward_path=tmp_path / f'fwd_{stripped}.txt',
            inverse_path=tmp_path / f'inv_{stripped}.txt',
            modality='T1w',
        )
        assert result.as_dict()['brain_extracted'] is stripped
        if not stripped:  # how far the brain-to-brain stage moved the whole-head fit
            assert result.as_dict()['mask_refinement']['moved_mm'] >= 0
            assert result.as_dict()['brain_stage']['moved_mm'] >= 0
        assert _truth_displacement(result.forward, world, template) < 1.5
        found[stripped] = read_itk_affine(result.forward)
    points = mask_points(template.brain_mask, step=2)
    assert mean_displacement(found[False], found[True], points) < 1.0


def test_strip_for_registration_keeps_the_brain_only(tmp_path, phantom_template):
    """The phantom head in the template's pose: its brain kept, scalp and background zeroed;
    a prior off the head (a wrong first fit) is refused, naming the file."""
    moving = _moving(tmp_path, 'head.nii.gz', sizes=(1.0, 1.0, 1.0))
    identity = write_itk_affine(np.eye(4), tmp_path / 'identity.txt')
    record = strip_for_registration(
        moving,
        phantom_template.brain_mask,
        identity,
        modality='T1w',
        out_file=tmp_path / 'brain.nii.gz',
    )
    head = nib.load(moving).get_fdata()
    kept = nib.load(tmp_path / 'brain.nii.gz').get_fdata() != 0
    _, truth = _phantom(head.shape, (1.0, 1.0, 1.0))
    assert 2 * np.sum(kept & truth) / (kept.sum() + truth.sum()) > 0.85
    from scipy import ndimage

    beyond = kept & ~ndimage.binary_dilation(truth, iterations=3)  # 3 mm past the brain
    assert beyond.sum() < 0.05 * kept.sum() and not kept[head < 5].any()  # the nose
    assert record['n4_shrink_factor'] == 8
    assert 0.7 < record['brain_litres'] / record['prior_litres'] < 1.3
    away = write_itk_affine(rigid_matrix(0, 0, (0.0, 0.0, 70.0)), tmp_path / 'away.txt')
    with pytest.raises(PreprocessingError, match='head.nii.gz'):
        strip_for_registration(
            moving, phantom_template.brain_mask, away, modality='T1w', out_file=tmp_path / 'x.nii'
        )


@pytest.mark.slow
def test_full_head_keeps_the_whole_head_fit_when_no_brain_is_found(
    tmp_path, phantom_template, monkeypatch
):
    """No plausible brain: the whole-head fit is the result, written where asked, and the
    record says why."""

    def no_brain(moving, *args, **kwargs):
        raise PreprocessingError(f'{moving}: no brain here')

    monkeypatch.setattr(registration, 'strip_for_registration', no_brain)
    world = rigid_matrix(6, 0, (2.0, -3.0, 8.0))
    result = register_to_template(
        _moving(tmp_path, 'moving.nii.gz', world=world),
        phantom_template,
        forward_path=tmp_path / 'out' / 'fwd.txt',
        inverse_path=tmp_path / 'out' / 'inv.txt',
        modality='T1w',
        sloppy=True,
    )
    details = result.as_dict()
    assert 'no brain here' in details['brain_stage']['skipped']
    assert details['fixed'] == 'template head, brain mask in the finest affine levels'
    assert result.forward == tmp_path / 'out' / 'fwd.txt' and result.inverse.exists()
    assert _truth_displacement(result.forward, world, phantom_template) < 3.0


_REGISTER_ONCE = """
import sys
from pathlib import Path
from cahal_bids.preprocessing.brain_template import TemplateBrain
from cahal_bids.preprocessing.registration import register_to_template
folder = Path(sys.argv[1])
template = TemplateBrain(name='Phantom', head=Path(sys.argv[2]), brain=Path(sys.argv[3]),
                         brain_mask=Path(sys.argv[4]), record={})
result = register_to_template(sys.argv[5], template, forward_path=folder / 'fwd.txt',
                              inverse_path=folder / 'inv.txt', modality='T1w', seed=3)
print(result.forward.read_text())
"""


@pytest.mark.slow
def test_registration_is_deterministic(tmp_path, phantom_template):
    """Same inputs, seed and one ITK thread: the same transforms, in two fresh processes.

    ITK reads ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS once, before the first ANTs call of a
    process; with several threads the metric's sums are not bit-reproducible.
    """
    import os
    import sys

    from helpers import run_captured

    moving = _moving(tmp_path, 'moving.nii.gz', world=rigid_matrix(8, 0, (3.0, -4.0, 12.0)))
    environment = {**os.environ, 'ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS': '1'}
    texts = []
    for run in ('a', 'b'):
        (tmp_path / run).mkdir()
        result = run_captured(
            [sys.executable, '-c', _REGISTER_ONCE, str(tmp_path / run),
             str(phantom_template.head), str(phantom_template.brain),
             str(phantom_template.brain_mask), str(moving)],
            env=environment,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        texts.append(result.stdout)
    assert texts[0].startswith('#Insight Transform File V1.0')
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_quality_flags_a_misregistration(tmp_path, phantom_template):
    moving = _moving(tmp_path, 'moving.nii.gz', sizes=(1.0, 1.0, 1.0))
    good = tmp_path / 'good.txt'
    write_itk_affine(np.eye(4), good)
    wrong = tmp_path / 'wrong.txt'
    write_itk_affine(rigid_matrix(25, 1, (8.0, 0.0, 18.0)), wrong)
    fine = registration_quality(moving, phantom_template, good, modality='T1w')
    bad = registration_quality(moving, phantom_template, wrong, modality='T1w')
    assert fine['nmi_brain'] > bad['nmi_brain']
    assert fine['doubtful'] is False
    assert fine['brain_coverage'] == pytest.approx(1.0)
    # the template's brain carried back onto the image's grid
    mask, affine = brain_mask_in_image(moving, phantom_template.brain_mask, good)
    _, truth = _phantom(mask.shape, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(affine, nib.load(str(moving)).affine, atol=1e-4)
    overlap = 2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum())
    assert overlap > 0.95


def test_composed_template_transform(tmp_path, phantom_template):
    """FLAIR -> T1w, then T1w -> template: the FLAIR's template transform and its check."""
    moving = _moving(tmp_path, 'flair.nii.gz', sizes=(1.0, 1.0, 1.0))
    to_t1w, t1w_to_template = (
        rigid_matrix(4, 2, (2.0, 0.0, 0.0)),
        rigid_matrix(-4, 2, (-2.0, 0.0, 0.0)),
    )
    write_itk_affine(to_t1w, tmp_path / 'flair2t1w.txt')
    write_itk_affine(np.linalg.inv(to_t1w), tmp_path / 't1w2tpl.txt')
    result = compose_to_template(
        moving,
        tmp_path / 'flair2t1w.txt',
        tmp_path / 't1w2tpl.txt',
        phantom_template,
        forward_path=tmp_path / 'fwd.txt',
        inverse_path=tmp_path / 'inv.txt',
        modality='FLAIR',
    )
    np.testing.assert_allclose(read_itk_affine(result.forward), np.eye(4), atol=1e-9)
    np.testing.assert_allclose(read_itk_affine(result.inverse), np.eye(4), atol=1e-9)
    details = result.as_dict()
    assert details['composed_through'] == 'T1w'
    assert details['quality']['doubtful'] is False
    del t1w_to_template


@pytest.mark.slow
def test_register_linear_rigid_only_with_a_mask(tmp_path, phantom_template):
    world = rigid_matrix(6, 2, (3.0, 2.0, -4.0))
    moving = _moving(tmp_path, 'moving.nii.gz', sizes=(1.0, 1.0, 1.0), world=world)
    result = register_linear(
        moving,
        phantom_template.head,
        forward_path=tmp_path / 'fwd.txt',
        inverse_path=tmp_path / 'inv.txt',
        affine=False,
        sloppy=True,
        fixed_mask=phantom_template.brain_mask,
        initialize=True,
    )
    assert result.stages == ('QuickRigid',)
    assert 'initialization' in result.as_dict()
    assert _truth_displacement(result.forward, world, phantom_template) < 1.5


# --- the template's brain -----------------------------------------------------------


def test_template_brain_is_cached_and_checked(tmp_path, monkeypatch, phantom_template):
    calls = []

    def fake_mask(head_file, *, mni_space=True, seed=0):
        calls.append(head_file)
        image = nib.load(str(phantom_template.brain_mask))
        return np.asarray(image.dataobj) > 0, image.affine, {'prior': 'test'}

    monkeypatch.setattr(brain_template, 'template_own_brain_mask', fake_mask)
    first = brain_extracted_template(phantom_template.head, tmp_path, name='Phantom')
    assert first.brain_mask.parent.name.startswith('Phantom-')
    assert first.record['brain_mask_sha256'] and len(calls) == 1
    second = brain_extracted_template(phantom_template.head, tmp_path, name='Phantom')
    assert len(calls) == 1 and second.record == first.record
    # an altered file is noticed and recomputed
    first.brain_mask.write_bytes(b'not the mask')
    third = brain_extracted_template(phantom_template.head, tmp_path, name='Phantom')
    assert (
        len(calls) == 2 and third.record['brain_mask_sha256'] == first.record['brain_mask_sha256']
    )
    brain = nib.load(str(third.brain)).get_fdata()
    mask = nib.load(str(third.brain_mask)).get_fdata() > 0
    assert np.all(brain[~mask] == 0) and np.all(brain[mask] >= 0)


@pytest.mark.shared_data
@pytest.mark.slow
def test_mni_template_brain_mask_is_reproducible(shared_data, tmp_path):
    """The brain of MNI152NLin2009cAsym, from nilearn's mask: brain-sized, same bytes twice."""
    head = (
        shared_data
        / 'templateflow/tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
    )
    first = brain_extracted_template(head, tmp_path / 'a', name='MNI152NLin2009cAsym')
    second = brain_extracted_template(head, tmp_path / 'b', name='MNI152NLin2009cAsym')
    assert first.record['brain_mask_sha256'] == second.record['brain_mask_sha256']
    assert 1.6 < first.record['recipe']['brain_litres'] < 2.0
    mask = nib.load(str(first.brain_mask))
    assert mask.shape == nib.load(str(head)).shape


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_skull_stripped_t1w_registers_from_a_tilted_shifted_header(shared_data, tmp_path):
    """sub-stroke01's skull-stripped T1w to the real MNI152NLin2009cAsym: recognised as
    skull-stripped, not doubtful, and the same registration (within 1 mm over the brain)
    when its header says the head is tilted by 15 degrees and 30 mm lower."""
    source = shared_data / 'hr/sub-stroke01/anat/sub-stroke01_T1w.nii.gz'
    head = (
        shared_data
        / 'templateflow/tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
    )
    template = brain_extracted_template(head, tmp_path / 'templates', name='MNI152NLin2009cAsym')
    image = nib.load(source)
    world = rigid_matrix(15, 0, (0.0, 5.0, -30.0))
    moved = tmp_path / 'moved.nii.gz'
    nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), world @ image.affine).to_filename(
        moved
    )
    results = {}
    for name, path in (('original', source), ('moved', moved)):
        results[name] = register_to_template(
            path,
            template,
            forward_path=tmp_path / f'{name}_fwd.txt',
            inverse_path=tmp_path / f'{name}_inv.txt',
            modality='T1w',
        )
        details = results[name].as_dict()
        assert details['brain_extracted'] is True
        assert details['quality']['doubtful'] is False, details['quality']
    # a template point is where the original holds it, and the moved copy holds that
    # anatomy at world @ point (LPS)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected = lps @ world @ lps @ read_itk_affine(results['original'].forward)
    points = mask_points(template.brain_mask, step=3)
    assert mean_displacement(read_itk_affine(results['moved'].forward), expected, points) < 1.0
