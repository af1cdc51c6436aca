"""The training loop end to end on tiny pipelines: learning, determinism, resume, saves, failures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from train_helpers import load_everything, make_spec, replace, train
from trainer.core.failures import JobFailure, Reason
from trainer.train.loop import LoopHooks, configure_attention, effective_mixed_precision


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_loss_falls_on_a_memorisable_dataset(tiny_models, tmp_path) -> None:
    """Two 64 px images, cached latents and text-encoder outputs: the loss must drop clearly."""
    from trainer.tools.tinydata import make_tiny_dataset

    make_tiny_dataset(tmp_path / "data", images=2, concepts=(("circle", 1),), size=(64, 64))
    spec = make_spec(tiny_models["sd1"], str(tmp_path / "data"),
                     training={"max_train_steps": 120, "seed": 0},
                     network={"train_unet_only": True, "dim": 8, "alpha": 8.0},
                     optimizer={"learning_rate": 3e-3},
                     precision={"cache_latents": True, "cache_text_encoder_outputs": True})
    result, _, _ = train(spec, tmp_path)
    h = result.loss_history
    assert len(h) == 120 and result.steps_done == 120 and result.stopped is None
    first, last = sum(h[:24]) / 24, sum(h[-24:]) / 24
    assert last < 0.6 * first, (first, last)
    assert result.cache_stats == {"hits": 0, "misses": 2, "stale": 0}


def test_same_seed_same_losses_and_tensorboard_events(tiny_models, tiny_data, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 3, "seed": 7, "min_snr_gamma": 5.0},
                     noise={"noise_offset": 0.05, "adaptive_noise_scale": 0.01},
                     optimizer={"learning_rate": 1e-3, "text_encoder_lr": 5e-4, "scale_weight_norms": 0.5},
                     logging={"log_prefix": "run-"}, scheduler={"type": "linear"})
    a, net_a, _ = train(spec, tmp_path / "a", seed=7)
    b, net_b, _ = train(spec, tmp_path / "b", seed=7)
    assert a.loss_history == b.loss_history
    assert all(torch.equal(x, y) for x, y in zip(net_a.state_dict().values(), net_b.state_dict().values()))
    multires = replace(spec, "noise", noise_offset=None, multires_noise_iterations=4, multires_noise_discount=0.3)
    c, _, _ = train(multires, tmp_path / "c", seed=7)
    assert c.loss_history != a.loss_history

    # TensorBoard: read back with tensorboard's own reader
    logs = tmp_path / "a" / "work" / "logs" / "tensorboard"
    (run_dir,) = list(logs.iterdir())
    assert run_dir.name.startswith("run-")
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "max_norm/keys_scaled",
            "max_norm/average_key_norm", "loss/epoch"} <= tags
    current = [e.value for e in events.Scalars("loss/current")]
    assert current == pytest.approx(a.loss_history)
    unet_lr = [e.value for e in events.Scalars("lr/unet")]
    assert unet_lr == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])  # linear decay over 3 steps
    te_lr = [e.value for e in events.Scalars("lr/textencoder")]
    assert te_lr[0] == pytest.approx(5e-4 * 2 / 3)


@pytest.mark.parametrize("network", [{"dropout": None, "rank_dropout": 0.1},
                                     {"algo": "dylora", "dim": 8, "block_size": 4}], ids=["lora", "dylora"])
def test_resume_gives_the_same_weights_as_training_straight(tiny_models, tiny_data, tmp_path, network) -> None:
    """4 steps with gradient accumulation 2 and a linear schedule, vs 2 + stop/checkpoint + resume 2
    (DyLoRA: its checkpointed rank blocks are split back, and its random block counts replay)."""
    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 4, "seed": 3,
                                                                "gradient_accumulation_steps": 2},
                     scheduler={"type": "linear"}, network=network)
    straight, net_straight, _ = train(spec, tmp_path / "straight", seed=3)

    states: list[tuple[str, int]] = []
    hooks = LoopHooks(should_stop=lambda: "preempted" if states == [] else None,
                      checkpoint_due=lambda step: step == 2,
                      on_checkpoint=lambda d, s: states.append((d, s)))
    calls = {"n": 0}

    def stop_after_two() -> str | None:
        calls["n"] += 1
        return "preempted" if calls["n"] == 2 else None

    hooks.should_stop = stop_after_two
    first, _, _ = train(spec, tmp_path / "resume", hooks=hooks, seed=3)
    assert first.stopped == "preempted" and first.steps_done == 2 and first.final_path is None
    assert [s for _, s in states] == [2]
    state_dir = states[0][0]
    progress = json.loads(Path(state_dir, "progress.json").read_text())
    assert progress["step"] == 2 and progress["batch_in_epoch"] == 4 and progress["epoch"] == 1

    second, net_second, _ = train(spec, tmp_path / "resume2", resume_from=state_dir, seed=3)
    assert second.steps_done == 4 and second.stopped is None
    assert second.loss_history == pytest.approx(straight.loss_history)
    for (name, x), y in zip(net_straight.state_dict().items(), net_second.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_nan_loss_stops_with_nan_loss(tiny_models, tiny_data, tmp_path) -> None:
    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 5},
                     optimizer={"learning_rate": 1e30, "max_grad_norm": 0.0}, network={"train_unet_only": True})
    with pytest.raises(JobFailure) as exc:
        train(spec, tmp_path)
    assert exc.value.reason == Reason.NAN_LOSS and exc.value.exit_code == 13
    assert "loss became nan" in exc.value.message and "learning rate" in exc.value.message


def test_saves_names_keep_last_precision_and_metadata(tiny_models, tiny_data, tmp_path) -> None:
    """6 images, batch 2 ⇒ 3 steps per epoch; 3 epochs = 9 steps."""
    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_epochs": 3, "batch_size": 2},
                     save={"output_name": "tiny", "save_every_n_steps": 2, "save_last_n_steps": 2,
                           "save_every_n_epochs": 1, "save_last_n_epochs": 1, "save_precision": "bf16",
                           "training_comment": "a comment"},
                     network={"algo": "locon", "conv_dim": 2, "conv_alpha": 1.0})
    seen: list[tuple[str, str]] = []
    result, network, parts = train(spec, tmp_path, hooks=LoopHooks(on_save=lambda p, k: seen.append((os.path.basename(p), k))))
    assert result.steps_done == 9 and result.epochs_done == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["tiny-000002.safetensors", "tiny-step00000006.safetensors",
                                                    "tiny-step00000008.safetensors", "tiny.safetensors"]
    assert seen == [("tiny-step00000002.safetensors", "step"), ("tiny-000001.safetensors", "epoch"),
                    ("tiny-step00000004.safetensors", "step"), ("tiny-step00000006.safetensors", "step"),
                    ("tiny-000002.safetensors", "epoch"), ("tiny-step00000008.safetensors", "step"),
                    ("tiny.safetensors", "final")]
    tensors, meta = _read(str(tmp_path / "out" / "tiny.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    expected = network.state_dict_for_save(torch.bfloat16)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors)
    assert meta["ss_steps"] == "9" and meta["ss_epoch"] == "3" and meta["ss_num_epochs"] == "3"
    assert meta["ss_max_train_steps"] == "9" and meta["ss_num_batches_per_epoch"] == "3"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_total_batch_size"] == "2"
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_training_comment"] == "a comment"
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and meta["ss_lr_scheduler"] == "constant"
    assert meta["ss_mixed_precision"] == "no" and meta["ss_clip_skip"] == "None" and meta["ss_seed"] == "0"
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "0"
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_circle": {"n_repeats": 1, "img_count": 3},
                                                   "1_square": {"n_repeats": 1, "img_count": 3}}
    assert "circle" in json.loads(meta["ss_tag_frequency"])["1_circle"]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "tiny"
    assert meta["sshs_model_hash"] and meta["sshs_legacy_hash"]
    _, step_meta = _read(str(tmp_path / "out" / "tiny-step00000006.safetensors"))
    assert step_meta["ss_steps"] == "6" and step_meta["ss_epoch"] == "2"
    assert step_meta["ss_session_id"] == meta["ss_session_id"]
    assert result.ss_metadata["ss_steps"] == "9"


def test_v_prediction_trains_against_the_velocity(tiny_models, tiny_data, tmp_path, monkeypatch) -> None:
    from trainer.train import loop

    seen = []
    original = loop.N.training_target

    def spy(sched, latents, noise, timesteps, *, v_prediction):
        seen.append(v_prediction)
        out = original(sched, latents, noise, timesteps, v_prediction=v_prediction)
        assert torch.allclose(out, sched.get_velocity(latents, noise, timesteps))
        return out

    monkeypatch.setattr(loop.N, "training_target", spy)
    spec = make_spec(tiny_models["sd2"], tiny_data, arch="sd2", training={"max_train_steps": 2, "min_snr_gamma": 5.0})
    result, _, _ = train(spec, tmp_path)
    assert seen == [True, True] and all(math.isfinite(x) for x in result.loss_history)
    _, meta = _read(result.final_path)
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.prediction_type"] == "v"


def test_checkpointing_and_bf16_autocast_run(tiny_models, tiny_data, tmp_path) -> None:
    """Gradient checkpointing does not change the math; bf16 autocast runs on CPU and stays close."""
    base = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 1, "seed": 5})
    plain, _, _ = train(base, tmp_path / "plain", seed=5)
    gc = replace(base, "training", gradient_checkpointing=True)
    checkpointed, _, _ = train(gc, tmp_path / "gc", seed=5)
    assert checkpointed.loss_history == pytest.approx(plain.loss_history, rel=1e-5)
    bf16 = replace(base, "precision", mixed_precision="bf16")
    low, _, _ = train(bf16, tmp_path / "bf16", seed=5)
    assert low.loss_history == pytest.approx(plain.loss_history, rel=0.05)
    _, meta = _read(low.final_path)
    assert meta["ss_mixed_precision"] == "bf16"



def test_torch_compile_trains_the_same_steps(tiny_models, tiny_data, tmp_path) -> None:
    """precision.torch_compile runs the step under torch.compile (through accelerate, as sd-scripts'
    --torch_compile): the same losses and adapter as eager. `aot_eager` traces forward and backward
    without inductor's C++ build, which would take minutes on this CPU."""
    import torch._dynamo

    base = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 2, "seed": 3},
                     network={"module": "networks.lora", "dim": 4, "alpha": 2.0})
    eager, net_eager, _ = train(base, tmp_path / "eager", seed=3)
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled_spec = replace(base, "precision", torch_compile=True, dynamo_backend="aot_eager")
    compiled, net_compiled, _ = train(compiled_spec, tmp_path / "compiled", seed=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames_before  # it did compile
    assert compiled.loss_history == pytest.approx(eager.loss_history, rel=1e-4)
    for (name, a), b in zip(net_eager.state_dict().items(), net_compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    torch._dynamo.reset()

def test_cancel_checkpoints_and_stops_without_a_final_file(tiny_models, tiny_data, tmp_path) -> None:
    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 5})
    states = []
    steps = []
    hooks = LoopHooks(should_stop=lambda: "cancelled", on_checkpoint=lambda d, s: states.append((d, s)),
                      on_step=lambda *a: steps.append(a))
    result, _, _ = train(spec, tmp_path, hooks=hooks)
    assert result.stopped == "cancelled" and result.steps_done == 1 and result.final_path is None
    assert [s for _, s in states] == [1] and os.path.exists(os.path.join(states[0][0], "progress.json"))
    step, total, epoch, loss, avg, lrs, it_per_s = steps[0]
    assert (step, total, epoch) == (1, 5, 1) and loss == avg and lrs == {"textencoder": 1e-3, "unet": 1e-3}
    assert it_per_s > 0
    assert not os.listdir(tmp_path / "out")


def test_latent_disk_cache_is_reused_and_detects_changes(tiny_models, tiny_data, tmp_path) -> None:
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cache_dir = str(tmp_path / "latents")
    spec = make_spec(tiny_models["sd1"], str(data), training={"max_train_steps": 1},
                     precision={"cache_latents": True, "cache_latents_to_disk": True},
                     dataset={"flip_aug": True})
    first, _, _ = train(spec, tmp_path / "1", latent_cache_dir=cache_dir)
    assert first.cache_stats == {"hits": 0, "misses": 6, "stale": 0}
    second, _, _ = train(spec, tmp_path / "2", latent_cache_dir=cache_dir)
    assert second.cache_stats == {"hits": 6, "misses": 0, "stale": 0}
    assert second.loss_history == first.loss_history  # same latents from disk as encoded

    image = next(p for p in sorted(data.rglob("*.png")))
    Image.open(image).transpose(Image.Transpose.ROTATE_180).save(image)  # changed content ⇒ new key
    third, _, _ = train(spec, tmp_path / "3", latent_cache_dir=cache_dir)
    assert third.cache_stats == {"hits": 5, "misses": 1, "stale": 0}
    for entry in Path(cache_dir).rglob("*.safetensors"):  # damaged entries are detected and re-encoded
        entry.write_bytes(b"not a safetensors file")
    fourth, _, _ = train(spec, tmp_path / "4", latent_cache_dir=cache_dir)
    assert fourth.cache_stats == {"hits": 0, "misses": 0, "stale": 6}
    fifth, _, _ = train(spec, tmp_path / "5", latent_cache_dir=cache_dir)
    assert fifth.cache_stats == {"hits": 6, "misses": 0, "stale": 0}


def test_network_weights_continue_from_a_file(tiny_models, tiny_data, tmp_path) -> None:
    spec = make_spec(tiny_models["sd1"], tiny_data, training={"max_train_steps": 2})
    first, net_first, _ = train(spec, tmp_path / "a")
    cont = replace(spec, "network", weights=first.final_path)
    # The file loads into a freshly initialised network exactly.
    _, fresh, _ = load_everything(cont, seed=1)
    fresh.load_weights(first.final_path)
    for (name, x), y in zip(net_first.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(x, y), name
    # A run given `network.weights` starts from them: with a vanishing lr (lr 0 would drop every group,
    # sd-scripts' rule) its result is the first run's weights.
    cont = replace(cont, "optimizer", learning_rate=1e-30)
    cont = replace(cont, "scheduler", type="constant")
    _, net_second, _ = train(cont, tmp_path / "b")
    for (name, x), y in zip(net_first.state_dict().items(), net_second.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-9), name


def test_precision_and_attention_choices() -> None:
    assert effective_mixed_precision("fp16", cuda=False) == "no"
    assert effective_mixed_precision("bf16", cuda=False) == "bf16"
    assert effective_mixed_precision("fp16", cuda=True) == "fp16"
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(JobFailure) as exc:
            configure_attention(torch.nn.Module(), "xformers")
        assert exc.value.reason == Reason.SPEC_INVALID and "sdpa" in exc.value.message
