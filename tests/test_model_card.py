"""Model cards are rendered from a manifest and an evaluation run."""

from __future__ import annotations

import json

from cahal_bids.evaluation.model_card import write_model_card


def _empty_evaluation(tmp_path):
    """An evaluation folder with no cases and a one-line table."""
    evaluation = tmp_path / 'eval'
    evaluation.mkdir()
    (evaluation / 'cases.json').write_text(
        json.dumps({'inputs': [], 'realizations': 1, 'seed': 0, 'cases': []})
    )
    (evaluation / 'tables.md').write_text('| PSNR | overall |\n')
    return evaluation


def test_model_card_reports_the_measured_figures(tmp_path, make_zoo):
    zoo = make_zoo(cells=['V1A3', 'V4A1'])
    evaluation = tmp_path / 'eval'
    evaluation.mkdir()
    cases = [
        {'method': 'trilinear', 'psnr': 30.0, 'cell': 'V1A3'},
        {'method': 'cahal', 'psnr': 31.5, 'cell': 'V1A3'},
        {'method': 'cahal', 'psnr': float('inf'), 'cell': 'V4A1'},
    ]
    (evaluation / 'cases.json').write_text(
        json.dumps(
            {'inputs': ['/x/sub-stroke01_T1w'], 'realizations': 2, 'seed': 0, 'cases': cases}
        )  # fmt: skip
    )
    (evaluation / 'tables.md').write_text('| PSNR | overall |\n| --- | ---: |\n| cahal | 31.5 |\n')
    path = write_model_card(
        zoo, evaluation, commands=['cahal-eval X --zoo Z --out E'],
        data_credits=['sub-x: MIT'], notes=['tiny'],
    )  # fmt: skip
    card = path.read_text()
    assert path.name == 'MODEL_CARD.md'
    assert 'test-zoo 0.0.0 (T1w)' in card and '2 residual 3D U-Net experts' in card
    assert 'trilinear 30.00 dB, cahal 31.50 dB' in card
    assert 'cahal-eval X --zoo Z --out E' in card and '- sub-x: MIT' in card
    assert 'sub-stroke01_T1w' in card and '| cahal | 31.5 |' in card
    assert 'those of the whole 1 mm volume' in card


def test_model_card_states_patch_mean_statistics(tmp_path, make_zoo):
    zoo = make_zoo(cells=['V1A3'], norm_statistics={'method': 'patch-mean', 'patches': 5})
    evaluation = _empty_evaluation(tmp_path)
    card = write_model_card(zoo, evaluation, commands=[], data_credits=[]).read_text()
    assert 'over 5 patches of 64^3 voxels centred in the head (seed 0)' in card
    assert 'Axis order: as acquired' in card


def test_model_card_states_the_axis_order(tmp_path, make_zoo):
    zoo = make_zoo('ordered', cells=['V1A3'], axis_order='thickest-last')
    evaluation = _empty_evaluation(tmp_path)
    card = write_model_card(zoo, evaluation, commands=[], data_credits=[]).read_text()
    assert 'the experts see the thickest low-resolution axis last' in card


def test_model_card_shows_real_lesions_and_ablations_when_measured(tmp_path, make_zoo):
    zoo = make_zoo(cells=['V1A3'])
    evaluation = _empty_evaluation(tmp_path)
    plain = write_model_card(zoo, evaluation, commands=[], data_credits=[]).read_text()
    assert '### Real lesions' not in plain and '### Ablations' not in plain
    (evaluation / 'real_lesions.md').write_text('| method | V4A1 contrast / volume |\n')
    card = write_model_card(
        zoo, evaluation, commands=[], data_credits=[], ablations='| zoo | PSNR |\n| g | 1 |\n'
    ).read_text()
    assert '### Real lesions' in card and '| method | V4A1 contrast / volume |' in card
    assert '### Ablations' in card and '| g | 1 |' in card


def test_model_card_says_where_each_expert_started(tmp_path, make_zoo):
    zoo = make_zoo(cells=['V1A3', 'V2A3', 'V3A1'])
    manifest_path = zoo / 'manifest.json'
    manifest = json.loads(manifest_path.read_text())
    origins = {
        'V1A3': ('old-zoo 0.1 expert V1A3', 150, 'fp32'),
        'V2A3': ('expert V1A3 (curriculum parent)', 120, {'fp32': 38, 'bf16': 82}),
        'V3A1': ('old-zoo 0.2 expert V3A1', 300, 'bf16'),
    }
    for cell, (origin, steps, precision) in origins.items():
        manifest['experts'][cell]['provenance'] = {
            'initialised_from': origin,
            'steps': steps,
            'precision': precision,
        }
    manifest['training'] = {'init_zoo': 'old-zoo 0.1', 'data': []}
    manifest_path.write_text(json.dumps(manifest))
    evaluation = _empty_evaluation(tmp_path)
    card = write_model_card(zoo, evaluation, commands=[], data_credits=[]).read_text()
    assert 'V1A3 from the same cell of old-zoo 0.1' in card
    assert 'V2A3 from the curriculum parent as fine-tuned just before in the same run' in card
    assert 'V3A1 from the same cell of old-zoo 0.2' in card
    assert '150 (V1A3), 120 (V2A3), 300 (V3A1)' in card
    assert 'training precision: fp32 (V1A3), 38 fp32 + 82 bf16 steps (V2A3), bf16 (V3A1)' in card


def test_model_card_names_the_augmentations_and_contrasts_of_the_run(tmp_path, make_zoo):
    zoo = make_zoo(cells=['V1A3'])
    manifest_path = zoo / 'manifest.json'
    manifest = json.loads(manifest_path.read_text())
    evaluation = _empty_evaluation(tmp_path)
    runs = {
        'plain': {'init_zoo': 'old-zoo 0.1', 'data': []},
        'augmented': {
            'init_zoo': 'old-zoo 0.1', 'init_from': 'same-cell', 'data': [],
            'ground_truth_blur': 0.6, 'contrast_augmentation': 0.3,
            'head_coverage_augmentation': 0.25, 'contrasts': ['T2w'],
        },
    }  # fmt: skip
    cards = {}
    for name, training in runs.items():
        manifest['training'] = training
        manifest_path.write_text(json.dumps(manifest))
        cards[name] = write_model_card(zoo, evaluation, commands=[], data_credits=[]).read_text()
    assert '- augmentation: gain, gamma, bias field, flips\n' in cards['plain']
    assert 'fine-tuned along the curriculum' in cards['plain']
    augmented = cards['augmented']
    assert 'fine-tuned each from the same cell of an existing zoo' in augmented
    assert 'ground-truth blur (Gaussian, sigma up to 0.6 voxel per axis' in augmented
    assert 'contrast remapping (a random monotonic or non-monotonic intensity curve, 30% of' in (
        augmented
    )
    assert 'head coverage (skull-stripped with the brain mask, 25% of the crops)' in augmented
    assert 'ground truths of T2w only' in augmented


def test_model_card_names_the_runs_of_a_merged_zoo(tmp_path, make_zoo):
    from cahal_bids.engine.zoo import Zoo
    from cahal_bids.training.zoo_merge import merge_zoos

    first = make_zoo('first', cells=['V1A3', 'V2A2'])
    second = make_zoo('second', cells=['V2A3'], seed=3)
    for folder, seconds in ((first, 100.0), (second, 260.0)):
        manifest = json.loads((folder / 'manifest.json').read_text())
        manifest['training'] = {'init_zoo': 'old-zoo 0.3', 'data': [], 'training_seconds': seconds}
        (folder / 'manifest.json').write_text(json.dumps(manifest))
    merged = merge_zoos([Zoo.open(first), Zoo.open(second)], tmp_path / 'merged')
    card = write_model_card(
        merged, _empty_evaluation(tmp_path), commands=[], data_credits=[]
    ).read_text()
    assert 'trained in 2 runs whose experts `cahal-train merge` combined' in card
    assert 'combined (V1A3, V2A2; V2A3)' in card  # one label for every run: not repeated
    assert '0.1 h of training in total' in card


def _card_inputs(tmp_path, **entries):
    path = tmp_path / 'card.json'
    path.write_text(json.dumps({'commands': ['cahal-eval X'], 'data_credits': ['sub-x: MIT'],
                                **entries}))  # fmt: skip
    return path


def test_cahal_train_card_shows_every_validation_image_and_the_selection(
    tmp_path, make_zoo, capsys
):
    from cahal_bids.cli.train import main

    zoo = make_zoo(cells=['V1A3'])
    evaluation = _empty_evaluation(tmp_path)
    split = tmp_path / 'split'
    split.mkdir()
    (split / 'split.md').write_text(
        '| route | image | contrast | kind |\n| --- | --- | --- | --- |\n'
        '| T1w | sub-arc2265_T2w | T2w | cross-contrast |\n'
    )
    inputs = _card_inputs(tmp_path, selection='sub-stroke01 and sub-philips01 chose the route.')
    argv = [str(zoo), '--evaluation', str(evaluation), '--card-inputs', str(inputs)]
    assert main(['card', *argv, '--split', str(split)]) == 0, capsys.readouterr().err
    card = (zoo / 'MODEL_CARD.md').read_text()
    assert '### Every validation image' in card
    assert '| T1w | sub-arc2265_T2w | T2w | cross-contrast |' in card
    assert 'Model selection: sub-stroke01 and sub-philips01 chose the route.' in card
    assert 'cahal-eval X' in card and '- sub-x: MIT' in card
    # without a split run the section is absent, not empty
    assert main(['card', *argv]) == 0
    assert '### Every validation image' not in (zoo / 'MODEL_CARD.md').read_text()
    assert '### Registration accuracy' not in (zoo / 'MODEL_CARD.md').read_text()


def test_cahal_train_card_shows_registration_runs(tmp_path, make_zoo, capsys):
    from cahal_bids.cli.train import main

    zoo = make_zoo(cells=['V1A3'])
    evaluation = _empty_evaluation(tmp_path)
    runs = []
    for name, tre in (('sub-a_T1w', '0.22'), ('sub-b_T2w', '0.31')):
        run = tmp_path / f'reg-{name}'
        run.mkdir()
        record = {'inputs': [f'/data/{name}.nii.gz'], 'zoo': {'name': 'cahal-t1w'}, 'cases': []}
        (run / 'cases.json').write_text(json.dumps(record))
        (run / 'registration.md').write_text(
            f'| image | cell | cahal TRE (mm) |\n| --- | --- | ---: |\n| {name} | V3A1 | {tre} |\n'
        )
        runs.append(str(run))
    argv = [
        str(zoo),
        '--evaluation',
        str(evaluation),
        '--card-inputs',
        str(_card_inputs(tmp_path)),
    ]
    assert main(['card', *argv, '--registration', *runs]) == 0, capsys.readouterr().err
    card = (zoo / 'MODEL_CARD.md').read_text()
    assert '### Registration accuracy (TRE)' in card
    assert 'sub-a_T1w (restored by cahal-t1w):' in card and '| sub-b_T2w | V3A1 | 0.31 |' in card
    assert main(['card', *argv, '--registration', str(tmp_path / 'none')]) == 2
    assert f'{tmp_path / "none" / "cases.json"}: not found' in capsys.readouterr().err


def test_cahal_train_card_names_the_bad_input(tmp_path, make_zoo, capsys):
    from cahal_bids.cli.train import main

    zoo = make_zoo(cells=['V1A3'])
    evaluation = _empty_evaluation(tmp_path)
    before = (zoo / 'MODEL_CARD.md').read_text() if (zoo / 'MODEL_CARD.md').exists() else None
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'commands': 'one string', 'data_credits': []}))
    argv = ['card', str(zoo), '--evaluation', str(evaluation), '--card-inputs']
    assert main([*argv, str(bad)]) == 2
    assert f'{bad}: "commands" must be a list of strings' in capsys.readouterr().err
    bad.write_text('{not json')
    assert main([*argv, str(bad)]) == 2 and 'not valid JSON' in capsys.readouterr().err
    missing_split = [*argv, str(_card_inputs(tmp_path)), '--split', str(tmp_path / 'nowhere')]
    assert main(missing_split) == 2
    assert f'{tmp_path / "nowhere" / "split.md"}: not found' in capsys.readouterr().err
    after = (zoo / 'MODEL_CARD.md').read_text() if (zoo / 'MODEL_CARD.md').exists() else None
    assert after == before, 'nothing written on a bad input'
