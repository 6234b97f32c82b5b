"""The per-image consistency guard and the projection onto the acquired data.

Mirrors :mod:`cahal_bids.physics.consistency` (re-acquisition and projection on any
acquired grid) and :mod:`cahal_bids.engine.consistency_guard` (the guard's numbers, the
warning, the sidecar, the report, the group table, the command lines).
"""

from __future__ import annotations

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from cahal_bids.app.group import collect_group_rows, consistency_warnings, write_group_summary
from cahal_bids.app.reports import write_group_report, write_subject_report
from cahal_bids.cli import enhance, evaluate, run
from cahal_bids.cli.parser import build_parser
from cahal_bids.core.errors import CahalError
from cahal_bids.core.grid import axis_operator, native_grid, resample_to_native_grid
from cahal_bids.core.resampling import apply_separable, box_weights
from cahal_bids.core.routing import route
from cahal_bids.engine.consistency_guard import (
    CONSISTENCY_MEASURE,
    CONSISTENCY_TOLERANCE,
    DEFAULT_PROJECTION,
    consistency_guard,
    project_onto_acquired,
    routed_acquisition,
)
from cahal_bids.engine.inference import Enhancer
from cahal_bids.engine.zoo import Zoo
from cahal_bids.evaluation.protocol import cahal_methods
from cahal_bids.physics.consistency import AcquiredGrid
from cahal_bids.physics.degradation import degrade

pytestmark = pytest.mark.usefixtures('one_thread')


def _sharp_phantom(shape, seed=0):
    """Blocks of random intensity 4 voxels wide: sharp edges in every direction."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(20.0, 100.0, size=tuple(-(-n // 4) for n in shape))
    blocks = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)[: shape[0], : shape[1], : shape[2]]
    volume = np.zeros(shape, dtype=np.float32)
    volume[2:-2, 2:-2, 2:-2] = blocks[2:-2, 2:-2, 2:-2]
    return volume


# --- the numbers ---------------------------------------------------------------------------


def test_an_exact_restoration_scores_zero_and_trilinear_does_not():
    truth = torch.from_numpy(_sharp_phantom((20, 18, 24)) / 100.0)
    _, low = degrade(truth, (1.0, 1.0, 3.0), return_low_resolution=True)
    acquired, grid = routed_acquisition(low, (1.0, 1.0, 3.0), (20, 18, 24), (False,) * 3)
    assert torch.equal(acquired, low)  # no sub-millimetre axis: the acquisition as it is
    assert grid == AcquiredGrid((20, 18, 8), (1.0, 1.0, 3.0), (20, 18, 24), (0.0, 0.0, 0.0))
    trilinear = resample_to_native_grid(low, (1.0, 1.0, 3.0), (20, 18, 24))
    inside = acquired > 0.05
    output, record = consistency_guard(truth, trilinear, acquired, grid, inside)
    assert output is truth
    assert record['rmse_cahal'] < 1e-6 and record['rmse_expert'] == record['rmse_cahal']
    assert record['rmse_trilinear'] > 0.01
    assert record['ratio'] < 1e-4 and record['warning'] is False
    assert record['projection'] == 'off' and record['measure'] == CONSISTENCY_MEASURE
    assert record['noise_sd'] is None and record['residual_kept'] is None
    # the measure by hand: box means of 3 slices against the acquired voxels, in the head
    again = truth.reshape(20, 18, 8, 3).mean(-1)
    difference = (trilinear.reshape(20, 18, 8, 3).mean(-1) - low)[inside]
    expected = float(difference.square().mean().sqrt())
    assert again.sub(low).abs().max() < 1e-6
    assert record['rmse_trilinear'] == pytest.approx(expected, rel=1e-5)
    # the trilinear reference itself is exactly as consistent as trilinear: no warning
    _, same = consistency_guard(trilinear, trilinear, acquired, grid, inside)
    assert same['ratio'] == 1.0 and same['warning'] is False
    # twice trilinear's error is a warning
    worse = trilinear + 2 * (trilinear - truth)
    _, record = consistency_guard(worse, trilinear, acquired, grid, inside)
    assert record['ratio'] > 1 + CONSISTENCY_TOLERANCE and record['warning'] is True


def test_an_empty_head_mask_gives_no_numbers_and_no_warning():
    low = torch.zeros(4, 4, 2)
    acquired, grid = routed_acquisition(low, (1.0, 1.0, 2.0), (4, 4, 4), (False,) * 3)
    _, record = consistency_guard(
        torch.ones(4, 4, 4), torch.zeros(4, 4, 4), acquired, grid, acquired > 1
    )
    assert record['rmse_cahal'] is None and record['rmse_trilinear'] is None
    assert record['ratio'] is None and record['warning'] is False


def _source_order_check(projected, low, affine):
    """Re-acquire ``projected`` in the image's own voxel axes (no reorientation at all):
    there the native grid starts at the outer edge of voxel 0 along every axis."""
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    down, average = [], []
    for n, r, m in zip(low.shape, sizes, projected.shape, strict=True):
        if r < 1:
            down.append(None)
            average.append(axis_operator(n, float(r), m))
        else:
            down.append(box_weights(m, 1.0, n, float(r)))
            average.append(None)
    again = apply_separable(torch.from_numpy(projected).double(), down)
    acquired = apply_separable(torch.from_numpy(low).double(), average)
    return again, acquired


@pytest.mark.parametrize(
    ('zooms', 'world_axes', 'signs'),
    [
        ((1.0, 1.0, 3.0), (0, 1, 2), (1, 1, 1)),  # RAS, integer
        ((0.9, 1.0, 3.3), (0, 1, 2), (-1, -1, -1)),  # LPI: every axis flipped, partial voxels
        ((3.3, 0.9, 1.2), (1, 2, 0), (-1, -1, 1)),  # PIR sagittal, thick axis first
    ],
    ids=['RAS', 'LPI', 'PIR'],
)
def test_the_projection_reproduces_the_acquired_image_in_any_orientation(
    make_affine, zooms, world_axes, signs
):
    shape = (7, 21, 20) if zooms[0] > 3 else (21, 20, 7)
    affine = make_affine(zooms=zooms, world_axes=world_axes, signs=signs, degrees=8.0)
    rng = np.random.default_rng(1)
    low = rng.uniform(0.0, 100.0, shape).astype(np.float32)
    grid = native_grid(shape, affine)
    estimate = rng.uniform(0.0, 100.0, grid.shape).astype(np.float32)
    projected = project_onto_acquired(estimate, low, affine)
    assert projected.shape == grid.shape and projected.dtype == np.float32
    again, acquired = _source_order_check(projected, low, affine)
    assert float((again - acquired).abs().max()) < 1e-3  # of intensities up to 100
    before, _ = _source_order_check(estimate, low, affine)
    assert float((before - acquired).abs().max()) > 10
    # a projection: applying it again changes nothing
    twice = project_onto_acquired(projected, low, affine)
    assert np.abs(twice - projected).max() < 1e-3


def test_the_projection_only_brings_an_estimate_closer_to_the_truth():
    truth = torch.from_numpy(_sharp_phantom((16, 16, 27), seed=3)).double()
    _, low = degrade(truth, (1.0, 2.0, 4.5), return_low_resolution=True)
    grid = AcquiredGrid(tuple(low.shape), (1.0, 2.0, 4.5), (16, 16, 27))
    assert float((grid.reacquire(truth) - low).abs().max()) < 1e-9
    rng = np.random.default_rng(0)
    for scale in (1.0, 10.0, 50.0):
        estimate = truth + torch.from_numpy(rng.normal(0.0, scale, truth.shape))
        projected = grid.project(estimate, low)
        assert grid.rmse(projected, low) < 1e-9
        assert torch.linalg.norm(projected - truth) < torch.linalg.norm(estimate - truth)
    assert float((grid.project(truth, low) - truth).abs().max()) < 1e-9


# --- the enhancer: warning, sidecar, log, report, group table ------------------------------


def _phantom_image(make_nifti, name='sub-01_T1w.nii.gz'):
    """A sharp phantom acquired at 1 x 1 x 4 mm, as a file."""
    truth = torch.from_numpy(_sharp_phantom((32, 28, 36)))
    _, low = degrade(truth, (1.0, 1.0, 4.0), return_low_resolution=True)
    return make_nifti(data=low.numpy(), zooms=(1.0, 1.0, 4.0), name=name)


@pytest.fixture
def zoos(make_zoo):
    """An identity expert (well-behaved) and one whose head adds a large random pattern."""
    return {
        'identity': Zoo.open(make_zoo('identity', cells=['V4A1'], head_scale=0.0)),
        'over': Zoo.open(make_zoo('over', cells=['V4A1'], head_scale=3.0)),
    }


def test_the_guard_warns_when_an_expert_over_corrects(tmp_path, make_nifti, zoos, caplog):
    source = _phantom_image(make_nifti)
    caplog.set_level(logging.WARNING, logger='cahal_bids.engine.inference')
    good = Enhancer(zoos['identity'], device='cpu').enhance_file(source, tmp_path / 'good.nii')
    record = good.sidecar['consistency']
    assert record['warning'] is False and record['ratio'] == pytest.approx(1.0, abs=1e-5)
    assert record['rmse_trilinear'] > 0.01 and record['projection'] == DEFAULT_PROJECTION
    assert not caplog.records
    bad = Enhancer(zoos['over'], device='cpu').enhance_file(source, tmp_path / 'bad.nii')
    record = bad.sidecar['consistency']
    assert record['warning'] is True
    assert record['ratio'] > 1 + CONSISTENCY_TOLERANCE
    assert record['rmse_expert'] > record['rmse_trilinear']
    # the default adaptive projection pulls the output back towards the (noise-free) data
    assert record['rmse_cahal'] < record['rmse_expert']
    assert json.loads(bad.sidecar_path.read_text())['consistency'] == record
    assert any('agrees less with the acquired data' in w for w in bad.sidecar['warnings'])
    [logged] = caplog.records
    assert logged.levelno == logging.WARNING and logged.name == 'cahal_bids.engine.inference'
    assert str(source) in logged.getMessage()
    # an image already at 1 mm is not restored, so it has no consistency record
    iso = make_nifti(shape=(8, 8, 8), zooms=(1.0, 1.0, 1.0), name='iso.nii.gz')
    skipped = Enhancer(zoos['over'], device='cpu').enhance_file(iso, tmp_path / 'iso_out.nii')
    assert 'consistency' not in skipped.sidecar


def _derivative(out, subject, result):
    """What the derivatives sink makes of an enhancement: image and sidecar under CAHAL."""
    anat = out / f'sub-{subject}' / 'anat'
    anat.mkdir(parents=True)
    stem = f'sub-{subject}_desc-cahal_T1w'
    shutil.copyfile(result.output_path, anat / f'{stem}.nii.gz')
    details = {k: v for k, v in result.sidecar.items() if k != 'input'}
    (anat / f'{stem}.json').write_text(json.dumps({'Sources': [], 'CAHAL': details}))


def test_the_report_and_the_group_table_show_the_guard(tmp_path, make_nifti, zoos, capsys):
    source = _phantom_image(make_nifti)
    out = tmp_path / 'out'
    for subject, zoo in (('01', zoos['identity']), ('02', zoos['over'])):
        enhancer = Enhancer(zoo, device='cpu', consistency_projection='off')
        result = enhancer.enhance_file(source, tmp_path / f'{subject}.nii')
        _derivative(out, subject, result)
    good = write_subject_report(out, '01').read_text()
    bad = write_subject_report(out, '02').read_text()
    for page in (good, bad):
        assert 'consistency RMSE, CAHAL / trilinear' in page
    assert 'Consistency warning' not in good and 'class="warning"' not in good
    assert '<p class="warning">Consistency warning' in bad
    rows = {row['subject']: row for row in collect_group_rows(out)}
    assert rows['01']['consistency_warning'] is False
    assert rows['02']['consistency_warning'] is True
    for row in rows.values():
        assert float(row['consistency_rmse_trilinear']) > 0
    assert float(rows['02']['consistency_rmse_cahal']) > float(
        rows['02']['consistency_rmse_trilinear']
    )
    table = write_group_summary(out, list(rows.values())).read_text().splitlines()
    header = table[0].split('\t')
    assert header[-3:] == [
        'consistency_rmse_cahal',
        'consistency_rmse_trilinear',
        'consistency_warning',
    ]
    flags = {line.split('\t')[0]: line.split('\t')[-1] for line in table[1:]}
    assert flags == {'01': 'False', '02': 'True'}
    page = write_group_report(out, list(rows.values())).read_text()
    assert '<td class="warning">True</td>' in page and '1 flagged by the consistency guard' in page
    assert [image for image, _ in consistency_warnings(out)] == [
        'sub-02/anat/sub-02_desc-cahal_T1w.nii.gz'
    ]
    assert consistency_warnings(out, ['01']) == []
    # the participant level names the flagged images of its participants at the end
    capsys.readouterr()
    assert run._print_consistency_warnings(out, ['01']) == 0
    assert capsys.readouterr().err == ''
    assert run._print_consistency_warnings(out, ['01', '02']) == 1
    assert 'WARNING: sub-02/anat/sub-02_desc-cahal_T1w.nii.gz' in capsys.readouterr().err
    # and so does the group level
    bids = tmp_path / 'bids'
    bids.mkdir()
    capsys.readouterr()
    assert run.main([str(bids), str(out), 'group']) == 0
    err = capsys.readouterr().err
    assert 'WARNING: sub-02/anat/sub-02_desc-cahal_T1w.nii.gz' in err
    assert '1 image(s) flagged by the consistency guard' in err


# --- the projection through the enhancer and the evaluation --------------------------------


def test_the_projection_makes_the_output_consistent_on_the_same_grid(tmp_path, make_nifti, zoos):
    source = _phantom_image(make_nifti)
    plain = Enhancer(zoos['over'], device='cpu', consistency_projection='off').enhance_file(
        source, tmp_path / 'plain.nii'
    )
    projected = Enhancer(zoos['over'], device='cpu', consistency_projection=True).enhance_file(
        source, tmp_path / 'projected.nii'
    )
    record = projected.sidecar['consistency']
    assert record['projection'] == 'exact'
    assert record['rmse_cahal'] < 1e-5
    assert record['rmse_expert'] == plain.sidecar['consistency']['rmse_expert']
    assert record['warning'] is True  # the guard still judges the expert's own output
    a, b = nib.load(plain.output_path), nib.load(projected.output_path)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert projected.sidecar['output_affine'] == plain.sidecar['output_affine']
    data = np.asarray(b.dataobj)
    assert np.abs(data - np.asarray(a.dataobj)).max() > 1.0
    # the same projection, applied after the fact (as the evaluation does)
    low = nib.load(source)
    after = project_onto_acquired(np.asarray(a.dataobj), np.asarray(low.dataobj), low.affine)
    assert np.abs(after - data).max() < 1e-4 * (data.max() - data.min())


def test_the_evaluation_compares_cahal_with_and_without_projection(make_zoo, monkeypatch):
    enhancer = Enhancer(
        make_zoo('random', cells=['V4A1'], head_scale=0.5),
        device='cpu',
        consistency_projection='off',
    )
    calls = []
    restore = enhancer.restore
    monkeypatch.setattr(enhancer, 'restore', lambda *a, **k: calls.append(1) or restore(*a, **k))
    methods = cahal_methods(enhancer, projections=('exact', 'adaptive'))
    assert list(methods) == ['cahal', 'cahal+projection', 'cahal+adaptive']
    truth = _sharp_phantom((24, 20, 30))
    resolution = (1.0, 1.0, 4.0)
    _, low = degrade(torch.from_numpy(truth), resolution, return_low_resolution=True)
    low = low.numpy()
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    plain = methods['cahal'](low, affine, resolution, truth.shape)
    projected = methods['cahal+projection'](low, affine, resolution, truth.shape)
    adaptive = methods['cahal+adaptive'](low, affine, resolution, truth.shape)
    assert len(calls) == 1  # one expert run serves all three
    assert plain.shape == projected.shape == truth.shape
    inside = Enhancer(enhancer.zoo, device='cpu', consistency_projection=True)
    direct, _, details = inside.restore(low, affine, route(resolution))
    assert details['consistency']['projection'] == 'exact'
    span = float(direct.max() - direct.min())
    assert np.abs(direct[:24, :20, :30] - projected).max() < 1e-4 * span
    assert np.linalg.norm(projected - truth) < np.linalg.norm(plain - truth)
    # the noise-free acquisition leaves the adaptive projection close to the exact one
    assert np.linalg.norm(adaptive - truth) < np.linalg.norm(plain - truth)
    inside = Enhancer(enhancer.zoo, device='cpu', consistency_projection='adaptive')
    direct, _, details = inside.restore(low, affine, route(resolution))
    assert details['consistency']['projection'] == 'adaptive'
    assert 0.0 < details['consistency']['residual_kept'] <= 1.0
    assert np.abs(direct[:24, :20, :30] - adaptive).max() < 1e-4 * span


# --- the command lines ---------------------------------------------------------------------


def test_cahal_enhance_records_the_projection(tmp_path, make_nifti, zoos, capsys):
    source = _phantom_image(make_nifti)
    for flags, expected in ((['--consistency-projection'], 'exact'),
                            (['--consistency_projection'], 'exact'),
                            (['--consistency-projection', 'adaptive'], 'adaptive'),
                            (['--consistency-projection', 'off'], 'off'),
                            ([], DEFAULT_PROJECTION)):  # fmt: skip
        out = tmp_path / f'{expected}{len(flags)}{flags[:1]}.nii.gz'
        argv = [str(source), str(out), '--zoo', str(zoos['identity'].path), '--quiet']
        assert enhance.main(argv + flags) == 0, capsys.readouterr().err
        sidecar = json.loads(out.with_name(out.name[: -len('.nii.gz')] + '.json').read_text())
        assert sidecar['consistency']['projection'] == expected


def test_cahal_bids_passes_the_projection_to_the_enhancement(tmp_path):
    from cahal_bids.app.config import RunConfig
    from cahal_bids.app.workflows.enhance import init_enhance_wf

    parser = build_parser()
    for flag in ('--consistency-projection', '--consistency_projection'):
        assert parser.parse_args(['d', 'o', 'participant', flag]).consistency_projection == 'exact'
    adaptive = parser.parse_args(['d', 'o', 'participant', '--consistency-projection', 'adaptive'])
    assert adaptive.consistency_projection == 'adaptive'
    assert (
        parser.parse_args(['d', 'o', 'participant']).consistency_projection == DEFAULT_PROJECTION
    )
    assert DEFAULT_PROJECTION == 'adaptive'
    with pytest.raises(SystemExit):
        parser.parse_args(['d', 'o', 'participant', '--consistency-projection', 'always'])
    config = RunConfig(
        bids_dir='/d', output_dir='/o', analysis_level='participant', work_dir='/w',
        consistency_projection='adaptive',
    )  # fmt: skip
    assert RunConfig.load(config.save(tmp_path / 'c.toml')).consistency_projection == 'adaptive'
    for projection in ('off', 'adaptive', 'exact'):
        workflow = init_enhance_wf(
            modality='T1w', denoise=False, device='cpu', zoo='/zoo', omp_nthreads=1,
            consistency_projection=projection,
        )  # fmt: skip
        assert workflow.get_node('enhance').inputs.consistency_projection == projection
        assert ('projected onto its acquired data' in workflow.__desc__) == (projection == 'exact')
        assert ('as far as the noise' in workflow.__desc__) == (projection == 'adaptive')
        assert 'consistency of each restored image' in workflow.__desc__


def test_cahal_eval_adds_the_projected_method(tmp_path, make_nifti, zoos, capsys):
    source = make_nifti(data=_sharp_phantom((24, 20, 30)), zooms=(1.0, 1.0, 1.0),
                        name='sub-01_T1w.nii.gz')  # fmt: skip
    argv = [str(source), '--zoo', str(zoos['over'].path), '--no-denoise', '--cells', 'V4A1',
            '--realizations', '1', '--quiet', '--no-segmenter', '--no-flat-check',
            '--threads', '1']  # fmt: skip
    assert evaluate.main([*argv, '--out', str(tmp_path / 'a')]) == 0, capsys.readouterr().err
    plain = json.loads((tmp_path / 'a' / 'cases.json').read_text())
    assert 'cahal+projection' not in plain['methods']
    out = tmp_path / 'b'
    assert evaluate.main([*argv, '--out', str(out), '--consistency-projection']) == 0
    record = json.loads((out / 'cases.json').read_text())
    assert record['methods']['cahal+projection'] == 'built-in'
    cases = {case['method']: case for case in record['cases']}
    assert set(cases) == {'trilinear', 'cubic', 'cahal', 'cahal+projection'}
    assert cases['cahal+projection']['data_consistency'] < cases['cahal']['data_consistency']
    assert cases['cahal+projection']['psnr'] > cases['cahal']['psnr']
    assert '| cahal+projection |' in (out / 'tables.md').read_text()


# --- the adaptive projection ---------------------------------------------------------------


def _adaptive_case(noise_sd: float, error_sd: float, seed: int = 0):
    grid = AcquiredGrid(shape=(24, 24, 8), resolution=(1.0, 1.0, 3.4), fine_shape=(24, 24, 27))
    rng = np.random.default_rng(seed)
    truth = torch.from_numpy(_sharp_phantom((24, 24, 27))).double()
    acquired = grid.reacquire(truth) + noise_sd * torch.from_numpy(rng.normal(size=grid.shape))
    smooth = torch.from_numpy(rng.normal(size=truth.shape)).double()
    estimate = truth + error_sd * smooth
    return grid, truth, acquired, estimate


def test_without_noise_the_adaptive_projection_is_the_exact_one():
    grid, _, acquired, estimate = _adaptive_case(0.0, 0.1)
    moved, kept = grid.project_adaptive(estimate, acquired, 0.0)
    assert kept == pytest.approx(1.0)
    assert torch.allclose(moved, grid.project(estimate, acquired), atol=1e-9)
    with pytest.raises(ValueError, match='noise_sd'):
        grid.project_adaptive(estimate, acquired, -1.0)
    with pytest.raises(ValueError, match='bands'):
        grid.project_adaptive(estimate, acquired, 0.1, bands=0)


def test_the_adaptive_projection_does_not_put_the_noise_back():
    """A right estimate of a noisy acquisition stays put; the exact projection adds the noise."""
    grid, truth, acquired, _ = _adaptive_case(0.05, 0.0)
    moved, kept = grid.project_adaptive(truth, acquired, 0.05)
    assert kept < 0.05
    exact = grid.project(truth, acquired)
    assert float((moved - truth).square().mean()) < 0.02 * float((exact - truth).square().mean())


def test_the_adaptive_projection_corrects_what_stands_above_the_noise():
    grid, truth, acquired, estimate = _adaptive_case(0.01, 0.3)
    moved, kept = grid.project_adaptive(estimate, acquired, 0.01)
    assert 0.5 < kept <= 1.0

    def error(image):
        return float((grid.reacquire(image) - grid.reacquire(truth)).square().mean())

    # what the acquisition sees of the error is nearly gone; the rest is never made worse
    assert error(moved) < 0.05 * error(estimate)
    assert float((moved - truth).square().mean()) < float((estimate - truth).square().mean())


def test_the_guard_records_the_adaptive_projection(tmp_path, make_nifti, zoos):
    source = _phantom_image(make_nifti)
    adaptive = Enhancer(zoos['over'], device='cpu', consistency_projection='adaptive')
    result = adaptive.enhance_file(source, tmp_path / 'adaptive.nii')
    record = result.sidecar['consistency']
    assert record['projection'] == 'adaptive'
    assert record['noise_sd'] is not None and 0.0 < record['residual_kept'] <= 1.0
    assert record['rmse_cahal'] < record['rmse_expert']  # moved towards the acquired data
    assert record['warning'] is True  # the guard still judges the expert's own output
    with pytest.raises(ValueError, match='consistency_projection'):
        Enhancer(zoos['over'], device='cpu', consistency_projection='always')


def test_a_denoised_input_is_projected_onto_its_raw_acquisition(tmp_path, make_nifti, zoos):
    """cahal-bids denoises first; the projection then aims at what was acquired."""
    source = _phantom_image(make_nifti)
    image = nib.load(source)
    raw = np.asarray(image.dataobj, dtype=np.float32)
    noisy = raw + np.random.default_rng(0).normal(0.0, 0.02 * raw.max(), raw.shape)
    acquired = tmp_path / 'raw.nii'
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), image.affine), acquired)
    enhancer = Enhancer(zoos['over'], device='cpu', consistency_projection='exact')
    own = enhancer.enhance_file(source, tmp_path / 'own.nii')
    aimed = enhancer.enhance_file(source, tmp_path / 'aimed.nii', acquired_path=acquired)
    assert own.sidecar['consistency']['projection_target'] == 'input'
    assert aimed.sidecar['consistency']['projection_target'] == 'acquired before denoising'
    assert aimed.sidecar['acquired_input'] == str(acquired)
    # the exact projection reproduces what it aimed at, not the (here: clean) input
    assert own.sidecar['consistency']['rmse_cahal'] < 1e-5
    assert aimed.sidecar['consistency']['rmse_cahal'] > 1e-3
    elsewhere = tmp_path / 'elsewhere.nii'
    nib.save(nib.Nifti1Image(noisy[:-1], image.affine), elsewhere)
    with pytest.raises(CahalError, match='not on the grid'):
        enhancer.enhance_file(source, tmp_path / 'bad.nii', acquired_path=elsewhere)


def test_cahal_bids_aims_the_projection_at_the_image_before_denoising():
    from cahal_bids.app.workflows.enhance import init_enhance_wf

    def aimed(projection, denoise):
        workflow = init_enhance_wf(
            modality='T1w', denoise=denoise, device='cpu', zoo='/zoo', omp_nthreads=1,
            consistency_projection=projection,
        )  # fmt: skip
        edges = workflow._graph.in_edges(workflow.get_node('enhance'), data=True)
        return any(('in_file', 'acquired_file') in data['connect'] for _, _, data in edges)

    assert aimed('adaptive', True) and aimed('exact', True)
    assert not aimed('off', True) and not aimed('adaptive', False)
