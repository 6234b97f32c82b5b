"""``cahal-eval`` end to end on a small skull-stripped phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cahal_bids.cli import evaluate

pytestmark = pytest.mark.usefixtures('one_thread')


def _brain(shape=(40, 44, 38)):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grid))
    image = np.where(radius < 0.85, 60.0, 0.0) + np.where(radius < 0.55, 40.0, 0.0)
    image += 10 * np.sin(7 * grid[0]) * (radius < 0.85)
    return image.astype(np.float32)


def test_eval_writes_cases_and_tables(tmp_path, make_nifti, make_zoo, capsys):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    zoo = make_zoo('identity', head_scale=0.0)
    out = tmp_path / 'eval'
    code = evaluate.main(
        [
            str(source),
            '--zoo',
            str(zoo),
            '--out',
            str(out),
            '--no-denoise',
            '--cells',
            'V3A2',
            'V6A1',
            '--realizations',
            '2',
            '--quiet',
            '--threads',
            '1',
            '--cahal-projection',
            'off',
        ]
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / 'cases.json').read_text())
    assert len(record['cases']) == 2 * 2 * 3
    assert {case['method'] for case in record['cases']} == {'trilinear', 'cubic', 'cahal'}
    assert record['zoo']['name'] == 'test-zoo'
    tables = (out / 'tables.md').read_text()
    assert '| cahal |' in tables and '| V6A1 |' in tables
    # an identity expert is exactly the trilinear reference
    overall = record['summary_psnr']['by_bin']['overall']
    assert abs(overall['cahal']['mean'] - overall['trilinear']['mean']) < 1e-3
    # the shipped T1w segmenter is used by default, and can be turned off
    from cahal_bids.engine.segmenter import default_segmenter_path

    shipped = default_segmenter_path('T1w')
    if shipped is not None:
        assert record['segmenter'] == str(shipped)
        assert all(case['dice'] for case in record['cases'])
    code = evaluate.main(
        [str(source), '--zoo', str(zoo), '--out', str(tmp_path / 'plain'), '--no-denoise',
         '--cells', 'V3A2', '--realizations', '1', '--quiet', '--no-segmenter',
         '--no-flat-check']
    )  # fmt: skip
    assert code == 0
    plain = json.loads((tmp_path / 'plain' / 'cases.json').read_text())
    assert plain['segmenter'] is None and all(case['dice'] is None for case in plain['cases'])


def test_eval_rejects_unknown_cells(tmp_path, make_nifti, make_zoo, capsys):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0))
    code = evaluate.main(
        [str(source), '--zoo', str(make_zoo()), '--out', str(tmp_path), '--cells', 'V1A1']
    )
    assert code == 2
    assert 'unknown cells' in capsys.readouterr().err


def _run_eval(source, zoo, out, *extra):
    return evaluate.main(
        [
            *[str(s) for s in (source if isinstance(source, list) else [source])],
            '--zoo',
            str(zoo),
            '--out',
            str(out),
            '--no-denoise',
            '--cells',
            'V3A2',
            'V6A1',
            '--realizations',
            '1',
            '--quiet',
            '--threads',
            '1',
            *extra,
        ]
    )


def test_eval_resumes_finished_cells(tmp_path, make_nifti, make_zoo, capsys, monkeypatch):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    zoo = make_zoo('identity', head_scale=0.0)
    out = tmp_path / 'eval'
    assert _run_eval(source, zoo, out, '--no-flat-check') == 0, capsys.readouterr().err
    first = json.loads((out / 'cases.json').read_text())
    assert sorted(p.name for p in (out / 'cases' / 'sub-01_T1w').iterdir()) == [
        'V3A2.json',
        'V3A2_slices.npz',
        'V6A1.json',
        'V6A1_slices.npz',
    ]
    assert (out / 'examples.png').stat().st_size > 0
    assert 'examples.png' in (out / 'report.html').read_text()

    # a rerun computes nothing: every cell comes from OUT/cases
    def refuse(*args, **kwargs):
        raise AssertionError('a finished cell was evaluated again')

    monkeypatch.setattr('cahal_bids.evaluation.protocol.evaluate_volume', refuse)
    assert _run_eval(source, zoo, out, '--no-flat-check') == 0, capsys.readouterr().err
    assert json.loads((out / 'cases.json').read_text())['cases'] == first['cases']
    # another protocol (seed) does not reuse them
    with pytest.raises(AssertionError, match='evaluated again'):
        _run_eval(source, zoo, out, '--no-flat-check', '--seed', '3')


def test_eval_reevaluates_only_the_cells_whose_expert_changed(
    tmp_path, make_nifti, make_zoo, capsys, monkeypatch
):
    import cahal_bids.evaluation.protocol as evaluation

    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    zoo = make_zoo('first', head_scale=0.0)
    out = tmp_path / 'eval'
    assert _run_eval(source, zoo, out, '--no-flat-check') == 0, capsys.readouterr().err
    # a refined V6A1 expert (another zoo's file and sha256), everything else unchanged
    other = make_zoo('other', head_scale=0.2, seed=5)
    manifest = json.loads((zoo / 'manifest.json').read_text())
    replacement = json.loads((other / 'manifest.json').read_text())['experts']['V6A1']
    (zoo / 'V6A1.safetensors').write_bytes((other / 'V6A1.safetensors').read_bytes())
    manifest['experts']['V6A1'] = replacement
    manifest['version'] = '0.0.1'
    (zoo / 'manifest.json').write_text(json.dumps(manifest))
    evaluated: list[tuple[str, ...]] = []
    real = evaluation.evaluate_volume

    def recording(*args, **kwargs):
        evaluated.append(tuple(kwargs['cells']))
        return real(*args, **kwargs)

    monkeypatch.setattr('cahal_bids.evaluation.protocol.evaluate_volume', recording)
    assert _run_eval(source, zoo, out, '--no-flat-check') == 0, capsys.readouterr().err
    assert evaluated == [('V6A1',)]


def test_eval_reevaluates_when_the_axis_order_changes(
    tmp_path, make_nifti, make_zoo, capsys, monkeypatch
):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    zoo = make_zoo('zoo', head_scale=0.2, cells=['V3A2', 'V6A1'])
    out = tmp_path / 'eval'
    assert _run_eval(source, zoo, out, '--no-flat-check') == 0, capsys.readouterr().err
    # the same weights, now declared as trained thickest-last: they run differently
    manifest = json.loads((zoo / 'manifest.json').read_text())
    manifest['axis_order'] = 'thickest-last'
    (zoo / 'manifest.json').write_text(json.dumps(manifest))

    def refuse(*args, **kwargs):
        raise AssertionError('evaluated again')

    monkeypatch.setattr('cahal_bids.evaluation.protocol.evaluate_volume', refuse)
    with pytest.raises(AssertionError, match='evaluated again'):
        _run_eval(source, zoo, out, '--no-flat-check')


def test_eval_seeds_do_not_depend_on_the_cell_subset(tmp_path, make_nifti, make_zoo):
    from cahal_bids.evaluation.protocol import evaluate_volume

    truth = _brain()
    mask = truth > 0
    one = evaluate_volume(
        truth, mask, np.eye(4), subject='s', enhancer=None, cells=('V6A1',), realizations=1
    )
    both = evaluate_volume(
        truth, mask, np.eye(4), subject='s', enhancer=None, cells=('V3A2', 'V6A1'), realizations=1
    )
    assert [c.resolution for c in one] == [c.resolution for c in both if c.cell == 'V6A1']


def test_eval_runs_a_command_line_method(tmp_path, make_nifti, make_zoo, capsys):
    """An external tool given as a template: here cahal-enhance itself, which must score
    as the built-in CAHAL path; and a tool writing on another grid is resampled."""
    import sys

    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    zoo = make_zoo('identity', head_scale=0.0)
    out = tmp_path / 'eval'
    shifted = tmp_path / 'copy_low.py'
    shifted.write_text(
        'import sys, nibabel as nib\n'
        'image = nib.load(sys.argv[1])\n'
        'nib.save(nib.Nifti1Image(image.get_fdata(), image.affine), sys.argv[2])\n'
    )
    program = Path(sys.executable).parent / 'cahal-enhance'
    enhance = f'{program} {{input}} {{output}} --zoo {zoo} -q --threads 1'
    code = _run_eval(
        source,
        zoo,
        out,
        '--no-flat-check',
        '--method',
        f'again={enhance}',
        '--method',
        f'low={sys.executable} {shifted} {{input}} {{output}}',
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / 'cases.json').read_text())
    by_method = {}
    for case in record['cases']:
        by_method.setdefault(case['method'], []).append(case['psnr'])
    assert set(by_method) == {'trilinear', 'cubic', 'cahal', 'again', 'low'}
    assert np.allclose(by_method['again'], by_method['cahal'], atol=1e-3)
    # the low-resolution image itself, resampled linearly by world coordinates, is close
    # to (not better than) the trilinear reference
    assert all(
        abs(a - b) < 3.0 for a, b in zip(by_method['low'], by_method['trilinear'], strict=True)
    )
    assert record['methods']['again'] == enhance


@pytest.mark.parametrize(
    ('spec', 'message'),
    [
        ('nocommand', 'NAME=COMMAND'),
        ('x=run {input}', "needs ['output']"),
        ('x=run {input} {output} {other}', 'unknown placeholder'),
        ('cahal=run {input} {output}', 'built-in'),
    ],
)
def test_eval_rejects_bad_method_templates(tmp_path, make_nifti, make_zoo, capsys, spec, message):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0))
    code = _run_eval(source, make_zoo(), tmp_path / 'eval', '--method', spec)
    assert code == 2
    assert message in capsys.readouterr().err


def test_failing_command_method_is_reported(tmp_path, make_nifti, make_zoo, capsys):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0))
    code = _run_eval(
        source, make_zoo(), tmp_path / 'eval', '--method', 'broken=false {input} {output}'
    )
    assert code == 1
    assert 'method broken: exit code 1' in capsys.readouterr().err


def test_eval_reads_a_bids_dataset_with_a_filter(tmp_path, make_nifti, make_zoo, capsys):
    root = tmp_path / 'bids'
    (root).mkdir()
    (root / 'dataset_description.json').write_text(
        json.dumps({'Name': 'eval test', 'BIDSVersion': '1.8.0'})
    )
    for subject in ('01', '02'):
        folder = root / f'sub-{subject}' / 'anat'
        folder.mkdir(parents=True)
        for acquisition in ('mprage', 'spgr'):
            make_nifti(
                data=_brain(),
                zooms=(1.0, 1.0, 1.0),
                name=f'sub-{subject}_acq-{acquisition}_T1w.nii.gz',
                folder=folder,
            )
    filters = tmp_path / 'filters.json'
    filters.write_text(json.dumps({'t1w': {'acquisition': 'mprage'}}))
    out = tmp_path / 'eval'
    code = _run_eval(
        root,
        make_zoo('identity', head_scale=0.0),
        out,
        '--no-flat-check',
        '--participant-label',
        '02',
        '--bids-filter-file',
        str(filters),
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / 'cases.json').read_text())
    assert [Path(p).name for p in record['inputs']] == ['sub-02_acq-mprage_T1w.nii.gz']
    assert {case['subject'] for case in record['cases']} == {'sub-02_acq-mprage_T1w'}
    assert _run_eval(root, make_zoo(), tmp_path / 'e2', '--participant-label', '07') == 2
    assert 'sub-07 not found' in capsys.readouterr().err


def test_eval_with_a_segmenter_reports_tissue_bias(tmp_path, make_nifti, make_zoo, capsys):
    from cahal_bids.engine.segmenter import TissueSegmenter, save_segmenter

    torch.manual_seed(0)
    segmenter = save_segmenter(TissueSegmenter(), tmp_path / 'seg', modality='T1w')
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    out = tmp_path / 'eval'
    code = _run_eval(
        source,
        make_zoo('identity', head_scale=0.0),
        out,
        '--segmenter',
        str(segmenter),
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / 'cases.json').read_text())
    case = record['cases'][0]
    assert set(case['dice']) <= {'CSF', 'GM', 'WM'} and case['dice']
    assert set(case['volume_error']) == set(case['dice'])
    bias = record['volumetric_bias']
    assert set(bias) == {'trilinear', 'cubic', 'cahal'}
    for by_class in bias.values():
        for entry in by_class.values():
            assert entry['low'] <= entry['mean'] <= entry['high']
    tables = (out / 'tables.md').read_text()
    assert 'volume error' in tables and 'Dice' in tables
    # the flat-region check ran at the ground truth's size
    assert record['flat_regions']['low_resolution_shape'] == [40, 44, 9]
    assert 'Flat regions' in tables


@pytest.mark.slow
def test_eval_registration_tre(tmp_path, make_nifti, make_zoo, capsys, monkeypatch):
    """--registration: each method's estimate and the truth registered to a phantom
    template; TRE rows, tables and figure; a rerun registers nothing again."""
    from cahal_bids.preprocessing import brain_template

    torch.set_num_threads(1)
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    template = make_nifti(data=_brain((48, 52, 46)), zooms=(1.0, 1.0, 1.0), name='tpl.nii.gz')

    def phantom_mask(head_file, *, mni_space=True, seed=0):
        import nibabel as nib

        image = nib.load(str(head_file))
        return np.asarray(image.dataobj) > 30, image.affine, {'prior': 'phantom threshold'}

    monkeypatch.setattr(brain_template, 'template_own_brain_mask', phantom_mask)
    zoo = make_zoo('identity', head_scale=0.0)
    out = tmp_path / 'eval'
    extra = ('--registration', '--registration-cells', 'V6A1', '--template-file',
             str(template), '--template-name', 'Phantom', '--sloppy', '--no-flat-check',
             '--no-segmenter')  # fmt: skip
    assert _run_eval(source, zoo, out, *extra) == 0, capsys.readouterr().err
    record = json.loads((out / 'registration.json').read_text())
    cases = record['cases']
    assert {(case['cell'], case['method']) for case in cases} == {
        ('V6A1', 'trilinear'),
        ('V6A1', 'cubic'),
        ('V6A1', 'cahal'),
    }
    assert all(np.isfinite(case['tre_mm']) and case['brain_extracted'] for case in cases)
    truth = json.loads((out / 'cases' / 'sub-01_T1w' / 'truth_registration.json').read_text())
    assert truth['reference']['record']['brain_extracted'] is True
    assert np.asarray(truth['reference']['matrix']).shape == (4, 4)
    assert record['template']['name'] == 'Phantom'
    assert '| sub-01_T1w | V6A1 |' in (out / 'registration.md').read_text()
    assert 'TRE against the registration of the ground truth' in (out / 'tables.md').read_text()
    assert (out / 'tre_by_cell.png').stat().st_size > 0

    # a rerun takes every registration from OUT/cases
    from cahal_bids.evaluation import registration

    def refuse(*args, **kwargs):
        raise AssertionError('registered again')

    monkeypatch.setattr(registration, 'register_to_template', refuse)
    assert _run_eval(source, zoo, out, *extra) == 0, capsys.readouterr().err
    assert json.loads((out / 'registration.json').read_text())['cases'] == cases


def test_eval_registration_cells_must_be_evaluated(tmp_path, make_nifti, make_zoo, capsys):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0))
    code = _run_eval(
        source, make_zoo(), tmp_path, '--registration', '--registration-cells', 'V7A1'
    )
    assert code == 2
    assert 'not evaluated' in capsys.readouterr().err


def test_eval_routes_runs_every_route_on_every_contrast(tmp_path, make_nifti, make_zoo, capsys):
    """``--routes``: each image prepared once, every route on every image, own and
    cross-contrast rows, cells below trilinear counted and shown."""
    brain = _brain()
    t1w = make_nifti(data=brain, zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    t2w = make_nifti(data=(brain.max() - brain) * (brain > 0), zooms=(1.0, 1.0, 1.0),
                     name='sub-02_T2w.nii.gz')  # fmt: skip
    identity = make_zoo('identity', head_scale=0.0)
    noisy = make_zoo('noisy', head_scale=3.0)
    out = tmp_path / 'split'
    code = evaluate.main(
        [str(t1w), str(t2w), '--routes', f'T1w={identity}', f'T2w={noisy}',
         f'FLAIR={identity}', '--out', str(out),
         '--no-denoise', '--cells', 'V3A2', 'V6A1', '--realizations', '1', '--quiet',
         '--no-flat-check', '--threads', '1', '--cahal-projection', 'off']
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(list((out / 'prepared').iterdir())) == 2, 'each image is prepared once'
    record = json.loads((out / 'split.json').read_text())
    rows = {(row['route'], row['contrast']): row for row in record['summary']}
    assert {route for route, _ in rows} == {'T1w', 'T2w', 'FLAIR'}
    assert {contrast for _, contrast in rows} == {'T1w', 'T2w'}
    # FLAIR is served by the same zoo as T1w here: its results are reused, not recomputed
    assert not (out / 'route-FLAIR').exists()
    for contrast in ('T1w', 'T2w'):
        same = {k: v for k, v in rows[('FLAIR', contrast)].items() if k not in ('route', 'kind')}
        assert same == {
            k: v for k, v in rows[('T1w', contrast)].items() if k not in ('route', 'kind')
        }
    assert rows[('T1w', 'T2w')]['kind'] == 'cross-contrast'
    assert rows[('T2w', 'T2w')]['kind'] == 'own'
    for contrast in ('T1w', 'T2w'):
        same = rows[('T1w', contrast)]  # the identity expert is trilinear interpolation
        assert abs(same['gain_over_trilinear_db']) < 1e-3 and same['cells_below_trilinear'] == 0
        worse = rows[('T2w', contrast)]  # a large random correction hurts everywhere
        assert worse['gain_over_trilinear_db'] < 0 and worse['cells_below_trilinear'] == 2
    for route in ('T1w', 'T2w'):
        assert (out / f'route-{route}' / 'cases.json').is_file()
    tables = (out / 'split.md').read_text()
    assert '| T2w | sub-02_T2w | T2w | own | 2 |' in tables
    assert tables.count('**') >= 8, 'the cells below trilinear are bold'
    # one per-cell table for the routes one zoo serves
    assert 'Routes T1w, FLAIR (one zoo): gain over' in tables
    assert tables.count('per cell; **bold** below trilinear.') == 2


def test_eval_routes_tabulates_the_projection_beside_the_expert(
    tmp_path, make_nifti, make_zoo, capsys
):
    """``--routes --consistency-projection``: the split tables again for the projected
    restorations, from the same cases (the expert ran once per case)."""
    t1w = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='sub-01_T1w.nii.gz')
    out = tmp_path / 'split'
    code = evaluate.main(
        [str(t1w), '--routes', f'T1w={make_zoo("noisy", head_scale=3.0)}', '--out', str(out),
         '--consistency-projection', '--no-denoise', '--cells', 'V6A1', '--realizations', '1',
         '--quiet', '--no-flat-check', '--threads', '1', '--cahal-projection', 'off']
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / 'split.json').read_text())
    plain = {row['image']: row for row in record['summary']}
    projected = {row['image']: row for row in record['projections']['exact']['summary']}
    assert record['projections']['exact']['method'] == 'cahal+projection'
    assert set(projected) == set(plain) == {'sub-01_T1w'}
    # the projection gives back what the acquisition saw: a random correction hurts less
    assert (
        projected['sub-01_T1w']['gain_over_trilinear_db']
        > (plain['sub-01_T1w']['gain_over_trilinear_db'])
    )
    tables = (out / 'split.md').read_text()
    assert tables.count('| T1w | sub-01_T1w | T1w | own | 1 |') == 2
    assert '## With projection exact (method cahal+projection)' in tables


def test_eval_routes_needs_the_contrast_of_a_nifti_and_no_zoo(
    tmp_path, make_nifti, make_zoo, capsys
):
    source = make_nifti(data=_brain(), zooms=(1.0, 1.0, 1.0), name='brain.nii.gz')
    code = evaluate.main([str(source), '--routes', 'T1w', '--out', str(tmp_path / 'a')])
    assert code == 2 and "found 'brain'" in capsys.readouterr().err
    code = evaluate.main(
        [str(source), '--routes', 'T1w', '--zoo', str(make_zoo()), '--out', str(tmp_path / 'b')]
    )
    assert code == 2 and 'exclude each other' in capsys.readouterr().err
    code = evaluate.main([str(source), '--routes', 'PDw', '--out', str(tmp_path / 'c')])
    assert code == 2 and "unknown route 'PDw'" in capsys.readouterr().err
