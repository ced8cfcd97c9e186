"""The Trainer's parts that a whole training run does not isolate: the output folder, the EMA swap,
the state a checkpoint restores, and its step as the benchmarks time it."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_hf.config.options import DDPMConfig
from ddpm_hf.config.sections import validate
from ddpm_hf.training.checkpoints import TrainerState
from ddpm_hf.training.ema import ema_weights, make_ema
from ddpm_hf.training.output import check_output_dir, prepare_output_dir


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_overwrite_output_dir_removes_what_an_earlier_run_left(tmp_path):
    out = tmp_path / "run"
    for name in ("checkpoints/checkpoint-4", "samples", "best_fid/unet"):
        (out / name).mkdir(parents=True)
    for name in ("samples/epoch_0001.png", "train_log.jsonl", "fid.json", "ood_results.json", "notes.txt"):
        (out / name).write_text("x")
    check_output_dir(out, True, None, {})
    prepare_output_dir(out, True)
    # The old grids, best_fid/, fid.json and the OOD results are gone; what is not a run's stays.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["notes.txt", "samples"]
    assert list((out / "samples").iterdir()) == []


def test_without_overwrite_an_earlier_run_is_refused_and_kept(tmp_path):
    from ddpm_hf.util.errors import UsageError

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        check_output_dir(out, False, None, {})
        prepare_output_dir(out, False)
    assert (out / "checkpoints" / "checkpoint-4").is_dir()


def test_ema_weights_are_swapped_in_and_out_even_on_error():
    unet = _tiny_unet().train()
    ema = make_ema(unet, 0.5)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    trained = [p.detach().clone() for p in unet.parameters()]
    ema.step(unet.parameters())  # shadow = (original + trained) / 2
    with ema_weights(ema, unet) as model:
        assert not model.training
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    assert unet.training and all(torch.equal(p, t) for p, t in zip(unet.parameters(), trained))
    with pytest.raises(RuntimeError), ema_weights(ema, unet):
        raise RuntimeError("sampling failed")
    assert unet.training and all(torch.equal(p, t) for p, t in zip(unet.parameters(), trained))


def test_trainer_state_round_trips_through_its_json():
    state = TrainerState(
        global_step=7, epoch=2, batches=3, skipped_nonfinite=1, loss_sum=torch.tensor(1.5), loss_count=4
    )
    saved = json.loads(json.dumps(state.progress()))
    assert "global_step" not in saved  # the checkpoint's folder name carries it
    restored = TrainerState()
    restored.restore(saved)
    assert (restored.epoch, restored.batches, restored.skipped_nonfinite, restored.loss_count) == (2, 3, 1, 4)
    assert restored.loss_sum.item() == 1.5


def test_trainer_step_updates_the_weights_the_ema_and_the_schedule():
    """train_step + after_update on build_parts, the step a run makes and benchmarks/run.py times."""
    from accelerate import Accelerator

    from ddpm_hf.training.parts import PART_SECTIONS, build_parts
    from ddpm_hf.training.train_step import after_update, model_input, train_step

    sections = validate(DDPMConfig(batch_size=4, timesteps=50, sample_timesteps=10, lr=1e-3, ema_rate=0.9, n_epochs=2))
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    parts = build_parts(Accelerator(cpu=True), _tiny_unet(), images, **sections.pick(*PART_SECTIONS))
    state = TrainerState.on(parts.accelerator.device)
    assert (parts.steps_per_epoch, parts.max_steps) == (2, 4)
    before = [p.detach().clone() for p in parts.model.parameters()]
    lr_before = parts.lr_scheduler.get_last_lr()[0]
    (batch,) = next(iter(parts.loader))
    flags = train_step(parts, state, model_input(parts, batch))
    assert flags.tolist() == [0.0, 0.0] and parts.accelerator.sync_gradients is True
    after_update(parts, state)
    assert state.global_step == 1 and state.loss_count == 1 and state.loss_sum.item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert parts.lr_scheduler.get_last_lr()[0] != lr_before
    # The EMA moved a tenth of the way from the old weights to the new ones.
    for old, new, shadow in zip(before, parts.model.parameters(), parts.ema.shadow_params):
        torch.testing.assert_close(shadow, old + 0.1 * (new.detach() - old))


@pytest.mark.parametrize("micro", [2, 3])
def test_micro_batches_give_the_batch_loss_and_gradient(micro):
    """--micro_batch_size splits the forward/backward, not the mathematics: the same noise and timesteps
    (drawn for the whole batch), the same mean loss and the same gradient as one pass."""
    from accelerate import Accelerator

    from ddpm_hf.training.parts import PART_SECTIONS, build_parts
    from ddpm_hf.training.train_step import forward_backward, model_input

    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    accelerator = Accelerator(cpu=True)
    results = {}
    for name, size in (("one_pass", 0), ("micro", micro)):
        sections = validate(
            DDPMConfig(
                batch_size=8, timesteps=50, sample_timesteps=10, loss_type="l2", snr_gamma=5.0, micro_batch_size=size
            )
        )
        parts = build_parts(accelerator, _tiny_unet(), images, **sections.pick(*PART_SECTIONS))
        assert parts.micro_batch == size
        torch.manual_seed(4)
        loss = forward_backward(parts, model_input(parts, images))
        results[name] = loss, torch.cat([p.grad.flatten() for p in parts.model.parameters()])
    torch.testing.assert_close(results["micro"][0], results["one_pass"][0])
    torch.testing.assert_close(results["micro"][1], results["one_pass"][1], rtol=1e-5, atol=1e-7)


def test_micro_batch_auto_is_32_on_a_cpu_and_off_on_a_gpu():
    from ddpm_hf.training.parts import resolve_micro_batch

    assert resolve_micro_batch(None, 128, torch.device("cpu")) == 32
    assert resolve_micro_batch(None, 32, torch.device("cpu")) == 0  # a batch that fits in one piece
    assert resolve_micro_batch(None, 128, torch.device("cuda")) == 0
    assert resolve_micro_batch(16, 128, torch.device("cuda")) == 16
