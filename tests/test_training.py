"""Training pairs, the fit loop with exact resumption, and the curriculum."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading

import numpy as np
import pytest
import torch

from cahal_bids.core.routing import CELLS, route
from cahal_bids.engine.networks import ResidualUNet3D
from cahal_bids.physics.acquisition import CellSampler
from cahal_bids.physics.degradation import Degrade
from cahal_bids.training.fit import (
    AnyCellSampler,
    TrainingSchedule,
    curriculum_order,
    fit,
    parent_cell,
)
from cahal_bids.training.pairs import (
    ContrastAugmentation,
    GroundTruthBlur,
    HeadCoverageAugmentation,
    IntensityAugmentation,
    PairStream,
    TrainingVolume,
    crop_with_zeros,
)

from helpers import l1_loss

pytestmark = pytest.mark.usefixtures('one_thread')


def _phantom(shape=(40, 44, 36), seed=0) -> TrainingVolume:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
    radius = np.sqrt(sum(g**2 for g in grid))
    image = np.where(radius < 0.9, 0.4, 0.0) + np.where(radius < 0.6, 0.4, 0.0)
    image = image + 0.2 * np.sin(6 * grid[0]) * (radius < 0.6)
    image = image + 0.01 * rng.standard_normal(shape)
    return TrainingVolume(
        image=image.astype(np.float32), head_mask=radius < 0.9, name=f'phantom{seed}'
    )


def test_pairs_have_the_requested_physics():
    stream = PairStream([_phantom()], CellSampler('V5A1'), patch_size=16, batch_size=3, seed=1)
    batch = next(stream)
    assert batch.inputs.shape == (3, 1, 16, 16, 16)
    assert batch.targets.shape == (3, 1, 16, 16, 16)
    for parameters in batch.parameters:
        assert route(parameters.resolution).cell == 'V5A1'
    assert not torch.equal(batch.inputs, batch.targets)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_pair_replays_from_its_record(seed):
    """Crop origin + degradation parameters + flips rebuild the pair exactly."""
    volume = _phantom()
    stream = PairStream([volume], AnyCellSampler(), patch_size=12, margin=12, seed=seed)
    pair = stream.next_pair()
    crop = torch.from_numpy(crop_with_zeros(volume.image, pair.crop_origin, (36, 36, 36)))
    inner = slice(12, 24)
    source = Degrade(pair.parameters)(crop)[inner, inner, inner]
    target = crop[inner, inner, inner]
    if pair.flipped_axes:
        source, target = source.flip(pair.flipped_axes), target.flip(pair.flipped_axes)
    source, target = source.permute(pair.axis_order), target.permute(pair.axis_order)
    assert torch.equal(pair.input[0], source)
    assert torch.equal(pair.target[0], target)


def test_thickest_last_pairs_are_the_plain_pairs_reordered():
    plain = PairStream([_phantom()], AnyCellSampler(), patch_size=12, seed=5)
    reordered = PairStream(
        [_phantom()], AnyCellSampler(), patch_size=12, seed=5, thickest_last=True
    )
    orders = set()
    for _ in range(8):
        a, b = plain.next_pair(), reordered.next_pair()
        assert a.axis_order == (0, 1, 2)
        resolution = a.parameters.resolution
        assert resolution[b.axis_order[2]] == max(resolution)
        assert torch.equal(b.input[0], a.input[0].permute(b.axis_order))
        assert torch.equal(b.target[0], a.target[0].permute(b.axis_order))
        orders.add(b.axis_order)
    assert len(orders) > 1  # slices were drawn along more than one axis


def test_stream_is_deterministic_and_resumable():
    first = PairStream([_phantom()], AnyCellSampler(), patch_size=12, seed=5)
    second = PairStream([_phantom()], AnyCellSampler(), patch_size=12, seed=5)
    assert torch.equal(next(first).inputs, next(second).inputs)
    saved = first.state()
    expected = next(first)
    second.set_state(saved)
    again = next(second)
    assert torch.equal(expected.inputs, again.inputs)
    assert torch.equal(expected.targets, again.targets)


def test_augmentation_keeps_zero_background_and_varies_contrast():
    augmentation = IntensityAugmentation(probability=1.0)
    patch = np.zeros((8, 8, 8), dtype=np.float32)
    patch[2:6, 2:6, 2:6] = 0.8
    out = augmentation(patch, np.random.default_rng(3))
    assert np.all(out[patch == 0] == 0)
    assert not np.allclose(out, patch)


def test_contrast_augmentation_keeps_edges_and_air_but_changes_tissue_order():
    patch = np.zeros((12, 12, 12), dtype=np.float32)
    patch[2:10, 2:10, 2:10] = 0.4  # "grey matter"
    patch[4:8, 4:8, 4:8] = 1.0  # "white matter"
    assert ContrastAugmentation(probability=0.0)(patch, np.random.default_rng(0)) is patch
    monotonic = ContrastAugmentation(probability=1.0, monotonic_probability=1.0)
    swapped = ContrastAugmentation(probability=1.0, monotonic_probability=0.0)
    reversed_seen = False
    for seed in range(40):
        out = monotonic(patch, np.random.default_rng(seed))
        assert out.dtype == np.float32 and np.all(out[patch == 0] == 0)  # air stays dark
        assert out[5, 5, 5] >= out[3, 3, 3]  # a monotonic curve keeps the tissue order
        assert 0 <= out.min() and out.max() <= 1
        # anatomy is kept: each tissue stays one intensity, so edges stay where they were
        assert len(np.unique(out)) <= 3
        other = swapped(patch, np.random.default_rng(seed))
        reversed_seen |= bool(other[5, 5, 5] < other[3, 3, 3])
    assert reversed_seen  # non-monotonic curves swap tissues (T1w-like to T2w-like)
    with pytest.raises(ValueError, match='knots'):
        ContrastAugmentation(knots=1)


def test_head_coverage_strips_volumes_with_a_brain_mask_only():
    rng = np.random.default_rng(0)
    image = (rng.random((30, 30, 30)) + 0.5).astype(np.float32)
    brain = np.zeros(image.shape, dtype=bool)
    brain[10:20, 10:20, 10:20] = True
    with_mask = TrainingVolume(image=image, head_mask=np.ones_like(brain), brain_mask=brain)
    without = TrainingVolume(image=image, head_mask=np.ones_like(brain))

    def truths(volume):
        stream = PairStream(
            [volume],
            lambda generator: (1.0, 1.0, 1.0),
            patch_size=30,
            batch_size=1,
            margin=0,
            head_coverage=HeadCoverageAugmentation(probability=1.0),
            flips=False,
            seed=0,
        )
        return stream.next_pair()

    stripped, kept = truths(with_mask), truths(without)
    target = stripped.target[0].numpy()
    crop_brain = crop_with_zeros(brain.astype(np.float32), stripped.crop_origin, (30,) * 3)
    assert np.all(target[crop_brain == 0] == 0) and np.all(target[crop_brain == 1] > 0)
    assert np.count_nonzero(kept.target[0].numpy()) > np.count_nonzero(target)
    with pytest.raises(ValueError, match='brain mask'):
        TrainingVolume(image=image, head_mask=brain | True, brain_mask=brain[:-1])


def test_ground_truth_blur_softens_within_its_bounds():
    rng = np.random.default_rng(0)
    patch = rng.random((24, 24, 24)).astype(np.float32)
    assert GroundTruthBlur(probability=0.0)(patch, rng) is patch
    assert GroundTruthBlur(max_sigma=0.0, probability=1.0)(patch, rng) is patch
    blurred = GroundTruthBlur(max_sigma=0.6, probability=1.0)(patch, np.random.default_rng(1))
    assert blurred.dtype == np.float32 and blurred.shape == patch.shape
    assert blurred.std() < patch.std()  # high frequencies are damped ...
    assert abs(float(blurred.mean()) - float(patch.mean())) < 1e-3  # ... the signal is kept
    # a sigma of at most 0.6 voxel keeps most of the variance of white noise
    assert blurred.std() > 0.3 * patch.std()
    again = GroundTruthBlur(max_sigma=0.6, probability=1.0)(patch, np.random.default_rng(1))
    assert np.array_equal(blurred, again)
    with pytest.raises(ValueError, match='max_sigma'):
        GroundTruthBlur(max_sigma=-1.0)
    with pytest.raises(ValueError, match='probability'):
        GroundTruthBlur(probability=2.0)


def test_blurred_pairs_share_one_truth():
    """With the blur the target is the blurred crop and the input is made from it, so an
    isotropic 1 mm 'acquisition' gives back exactly the target."""
    rng = np.random.default_rng(2)
    image = rng.random((40, 40, 40)).astype(np.float32)
    volume = TrainingVolume(image=image, head_mask=np.ones_like(image, dtype=bool))
    stream = PairStream(
        [volume],
        lambda generator: (1.0, 1.0, 1.0),
        patch_size=16,
        batch_size=2,
        margin=4,
        blur=GroundTruthBlur(max_sigma=0.6, probability=1.0),
        flips=False,
        seed=0,
    )
    batch = next(stream)
    assert torch.equal(batch.inputs, batch.targets)
    pair = stream.next_pair()
    raw = crop_with_zeros(image, pair.crop_origin, (24, 24, 24))[4:20, 4:20, 4:20]
    assert torch.equal(pair.input, pair.target)
    assert not np.allclose(pair.target[0].numpy(), raw)  # the truth itself was blurred


def test_curriculum_parents():
    assert parent_cell('V1A3') is None
    order = curriculum_order()
    assert sorted(order) == sorted(CELLS)
    assert order[0] == 'V1A3'
    for cell in order:
        parent = parent_cell(cell)
        if parent is not None:
            assert order.index(parent) < order.index(cell)
            # weights move one step: along volume at fixed anisotropy, or along anisotropy
            assert abs(int(parent[1]) - int(cell[1])) + abs(int(parent[3]) - int(cell[3])) == 1


def _train(run_dir, max_steps, loss_fn=l1_loss, mixed_precision=False):
    torch.manual_seed(0)
    network = ResidualUNet3D(levels=2, initial_filters=4)
    stream = PairStream([_phantom()], CellSampler('V4A1'), patch_size=12, batch_size=2, seed=3)
    schedule = TrainingSchedule(max_steps=max_steps, learning_rate=1e-2, evaluate_every=2)
    result = fit(
        network,
        stream,
        loss_fn,
        run_dir=run_dir,
        schedule=schedule,
        progress=False,
        mixed_precision=mixed_precision,
    )
    return network, result


@pytest.mark.parametrize('mixed_precision', [False, True], ids=['fp32', 'bf16'])
def test_fit_learns_and_resumes_exactly(tmp_path, mixed_precision):
    whole, result = _train(tmp_path / 'whole', 8, mixed_precision=mixed_precision)
    assert result.steps == 8
    rows = list(csv.DictReader((tmp_path / 'whole' / 'loss.csv').open()))
    assert [int(r['step']) for r in rows] == list(range(1, 9))

    _train(tmp_path / 'split', 5, mixed_precision=mixed_precision)  # interrupted after 5 steps
    # a fresh process would do the same
    resumed, result = _train(tmp_path / 'split', 8, mixed_precision=mixed_precision)
    assert result.steps == 8
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    rows = list(csv.DictReader((tmp_path / 'split' / 'loss.csv').open()))
    assert [int(r['step']) for r in rows] == list(range(1, 9))


def test_bf16_autocast_runs_the_network_only(tmp_path):
    seen = []

    def loss_fn(prediction, target):
        seen.append(prediction.dtype)
        return l1_loss(prediction, target)

    plain, _ = _train(tmp_path / 'fp32', 3)
    mixed, result = _train(tmp_path / 'bf16', 3, loss_fn=loss_fn, mixed_precision=True)
    assert result.steps_by_precision == {'bf16': 3}
    assert seen == [torch.float32] * 3  # the losses (Fourier term included) stay float32
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    # ... while the network really ran in bfloat16: same start, same batches, other weights
    assert any(
        not torch.equal(a, b) for a, b in zip(plain.parameters(), mixed.parameters(), strict=True)
    )


def test_steps_are_counted_per_precision_across_resumptions(tmp_path):
    _, result = _train(tmp_path, 2)
    assert result.steps_by_precision == {'fp32': 2}
    _, result = _train(tmp_path, 5, mixed_precision=True)
    assert result.steps_by_precision == {'fp32': 2, 'bf16': 3}
    # checkpoints from before the count was kept: their steps are "unrecorded"
    state_path = tmp_path / 'checkpoint.json'
    state = json.loads(state_path.read_text())
    del state['steps_by_precision']
    state_path.write_text(json.dumps(state))
    _, result = _train(tmp_path, 6)
    assert result.steps_by_precision == {'unrecorded': 5, 'fp32': 1}


def test_fit_reduces_the_loss(tmp_path):
    torch.manual_seed(0)
    network = ResidualUNet3D(levels=2, initial_filters=4)
    stream = PairStream([_phantom()], CellSampler('V5A1'), patch_size=16, batch_size=2, seed=0)
    schedule = TrainingSchedule(max_steps=40, learning_rate=3e-3, evaluate_every=5)
    fit(network, stream, l1_loss, run_dir=tmp_path, schedule=schedule, progress=False)
    rows = list(csv.DictReader((tmp_path / 'loss.csv').open()))
    first = np.mean([float(r['loss']) for r in rows[:8]])
    last = np.mean([float(r['loss']) for r in rows[-8:]])
    assert last < first


def test_checkpoint_tamper_is_detected(tmp_path):
    _train(tmp_path, 2)
    target = tmp_path / 'checkpoint.safetensors'
    payload = bytearray(target.read_bytes())
    payload[-1] ^= 0xFF
    target.write_bytes(bytes(payload))
    with pytest.raises(RuntimeError, match='sha256'):
        _train(tmp_path, 4)


def test_schedule_validation():
    with pytest.raises(ValueError, match='max_steps'):
        TrainingSchedule(max_steps=0)
    with pytest.raises(ValueError, match='learning_rate'):
        TrainingSchedule(learning_rate=-1)


def test_resume_with_more_patience_continues_after_an_early_stop(tmp_path):
    def run(patience, max_steps):
        torch.manual_seed(0)
        network = ResidualUNet3D(levels=2, initial_filters=4)
        stream = PairStream([_phantom()], CellSampler('V4A1'), patch_size=12, seed=3)
        schedule = TrainingSchedule(
            max_steps=max_steps,
            learning_rate=1e-9,  # no progress: the early stop triggers at once
            evaluate_every=1,
            early_stop_patience=patience,
        )
        return fit(network, stream, l1_loss, run_dir=tmp_path, schedule=schedule, progress=False)

    stopped = run(patience=2, max_steps=50)
    assert stopped.stopped_early and stopped.steps < 50
    resumed = run(patience=1000, max_steps=stopped.steps + 3)
    assert not resumed.stopped_early
    assert resumed.steps == stopped.steps + 3


STOPPABLE_RUN = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from cahal_bids.physics.acquisition import CellSampler
from cahal_bids.engine.networks import ResidualUNet3D
from cahal_bids.training.pairs import PairStream, TrainingVolume
from cahal_bids.training.fit import TrainingSchedule, fit
image = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
volume = TrainingVolume(image=image, head_mask=image > 0.2, name='noise')
stream = PairStream([volume], CellSampler('V4A1'), patch_size=8, margin=6, seed=0)
def l1(p, t):
    loss = (p - t).abs().mean()
    return loss, {}
result = fit(ResidualUNet3D(levels=2, initial_filters=2), stream, l1, run_dir=sys.argv[1],
             schedule=TrainingSchedule(max_steps=10**6, evaluate_every=1), progress=False)
print('stopped at', result.interrupted, result.steps)
"""


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, '-c', STOPPABLE_RUN, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / 'loss.csv'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    steps = int(stdout.split()[-1])
    assert steps >= 3
    assert stdout.split()[-2] == 'True'  # result.interrupted
    state = json.loads((tmp_path / 'checkpoint.json').read_text())
    assert state['step'] == steps


def test_fit_reports_a_stop_request_but_not_a_spent_time_budget(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip('fit only catches SIGTERM in the main thread')

    def run(run_dir, max_steps, stop_at=None, time_budget_s=None):
        calls = []

        def stopping_l1(prediction, target):
            calls.append(1)
            if len(calls) == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return l1_loss(prediction, target)

        torch.manual_seed(0)
        network = ResidualUNet3D(levels=2, initial_filters=2)
        stream = PairStream([_phantom()], CellSampler('V4A1'), patch_size=8, batch_size=1)
        schedule = TrainingSchedule(max_steps=max_steps, time_budget_s=time_budget_s)
        return fit(network, stream, stopping_l1, run_dir=run_dir, schedule=schedule,
                   progress=False)  # fmt: skip

    stopped = run(tmp_path / 'stopped', max_steps=6, stop_at=2)
    assert stopped.interrupted and stopped.steps == 2
    assert json.loads((tmp_path / 'stopped' / 'checkpoint.json').read_text())['step'] == 2
    resumed = run(tmp_path / 'stopped', max_steps=6)
    assert not resumed.interrupted and resumed.steps == 6
    # a request on the very last step still reaches the caller
    last = run(tmp_path / 'last', max_steps=2, stop_at=2)
    assert last.interrupted and last.steps == 2
    spent = run(tmp_path / 'spent', max_steps=6, time_budget_s=0.0)
    assert not spent.interrupted and spent.steps == 0


def test_cosine_schedule_decays_from_the_rate_to_the_floor(tmp_path):
    schedule = TrainingSchedule(
        max_steps=6, learning_rate=1e-2, min_learning_rate=1e-4, lr_schedule='cosine'
    )
    assert schedule.learning_rate_at(0) == pytest.approx(1e-2)
    assert schedule.learning_rate_at(3) == pytest.approx((1e-2 + 1e-4) / 2)
    assert schedule.learning_rate_at(6) == pytest.approx(1e-4)
    torch.manual_seed(0)
    network = ResidualUNet3D(levels=2, initial_filters=2)
    stream = PairStream([_phantom()], CellSampler('V4A1'), patch_size=8, batch_size=1, seed=0)
    fit(network, stream, l1_loss, run_dir=tmp_path, schedule=schedule, progress=False)
    rates = [float(r['lr']) for r in csv.DictReader((tmp_path / 'loss.csv').open())]
    expected = [schedule.learning_rate_at(step) for step in range(6)]
    np.testing.assert_allclose(rates, expected, rtol=1e-2)
    with pytest.raises(ValueError, match='lr_schedule'):
        TrainingSchedule(lr_schedule='step')
