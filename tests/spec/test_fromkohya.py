"""from-kohya: sd-scripts command lines and config files → JobSpec, with notes for what was not mapped."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trainer.core.fromkohya import convert, main
from trainer.core.spec import decode_spec

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def convert_fixture(name: str):
    path = FIXTURES / name
    return convert(path.read_text(encoding="utf-8"), base_dir=path.parent)


def notes_about(notes: list[str], flag: str) -> list[str]:
    return [n for n in notes if n.startswith(flag)]


def test_pony_sdxl_command_from_the_guide() -> None:
    spec, notes = convert_fixture("pony_sdxl_locon.sh")
    assert spec is not None, notes
    assert spec.model.arch == "sdxl" and spec.model.uri == "/ponydiffusers/"
    assert spec.model.lowram and spec.model.no_half_vae
    assert spec.dataset.uri == "/training_dir" and spec.dataset.resolution == 1024
    assert (spec.dataset.enable_bucket, spec.dataset.min_bucket_reso, spec.dataset.max_bucket_reso,
            spec.dataset.bucket_reso_steps) == (True, 256, 1024, 32)
    assert spec.dataset.caption_extension == ".txt" and spec.dataset.shuffle_caption and spec.dataset.keep_tokens == 1
    assert spec.dataset.dataset_repeats == 0 and spec.dataset.max_data_loader_n_workers == 8
    net = spec.network
    assert (net.module, net.algo, net.preset, net.dim, net.alpha, net.conv_dim, net.conv_alpha) == (
        "lycoris.kohya", "locon", "full", 8, 4.0, 256, 4.0)
    assert net.block_dims is None and net.block_alphas is None  # lycoris.kohya ignores them
    assert (net.use_tucker, net.use_scalar, net.train_norm) == (False, False, False)
    opt = spec.optimizer
    assert (opt.type, opt.learning_rate, opt.unet_lr, opt.text_encoder_lr) == ("AdamW", 1e-4, 1e-4, 1e-4)
    assert opt.scale_weight_norms == 1.0 and opt.max_grad_norm == 1.0
    assert spec.scheduler.type == "cosine"
    tr = spec.training
    assert (tr.max_train_steps, tr.batch_size, tr.gradient_accumulation_steps, tr.gradient_checkpointing) == (
        400, 8, 6, True)
    assert (spec.noise.multires_noise_iterations, spec.noise.multires_noise_discount) == (10, 0.1)
    prec = spec.precision
    assert (prec.mixed_precision, prec.attention, prec.cache_latents, prec.cache_latents_to_disk) == (
        "fp16", "sdpa", True, True)
    assert (spec.save.output_uri, spec.save.output_name, spec.save.save_precision, spec.save.save_every_n_epochs) == (
        "/output_dir", "yifftoolkit", "fp16", 50)
    assert (spec.sample.sampler, spec.sample.every_n_steps) == ("euler_a", 100)
    assert spec.logging.log_prefix == "xl-locon"
    assert (spec.resources.gpus, spec.resources.nodes) == (1, 1)
    # What was not mapped, with the reason.
    assert "25 values" in notes_about(notes, "--network_args block_dims")[0]
    assert "ignored" in notes_about(notes, "--network_args block_alphas")[0]
    assert "lycoris.kohya does not read it" in notes_about(notes, "--network_dropout")[0]
    assert notes_about(notes, "accelerate --num_cpu_threads_per_process")
    assert "could not be read" in notes_about(notes, "--sample_prompts")[0]


def test_sd15_command_with_variables_two_gpus_and_networks_lora() -> None:
    spec, notes = convert_fixture("sd15_character_lora.sh")
    assert spec is not None, notes
    assert spec.model.arch == "sd1" and spec.model.uri == "s3://lathe-models/sd15/v1-5-pruned-emaonly.safetensors"
    assert spec.dataset.uri == "s3://lathe-data/mayuri" and spec.dataset.reg_uri == "s3://lathe-data/mayuri-reg"
    assert spec.save.output_uri == "s3://lathe-out/mayuri-v1s1600" and spec.name == "mayuri-v1s1600"
    assert spec.logging.log_prefix == "mayuri-v1s1600_"
    assert (spec.resources.gpus, spec.resources.nodes) == (2, 1)
    net = spec.network
    assert (net.module, net.dim, net.alpha, net.conv_dim, net.conv_alpha, net.dropout) == (
        "networks.lora", 32, 16.0, 8, 4.0, 0.1)
    assert net.block_dims is not None and len(net.block_dims) == 25 and net.block_dims[12] == 16
    assert spec.optimizer.type == "AdamW8bit"
    assert spec.optimizer.args == {"weight_decay": 0.01, "betas": [0.9, 0.999]}
    assert (spec.optimizer.unet_lr, spec.optimizer.text_encoder_lr) == (1e-4, 5e-5)
    assert (spec.scheduler.type, spec.scheduler.num_cycles, spec.scheduler.warmup_steps) == (
        "cosine_with_restarts", 4, 0.05)  # the ratio came through $lr_warmup_ratio
    assert (spec.training.max_train_epochs, spec.training.seed, spec.training.min_snr_gamma) == (10, 42, 5.0)
    assert spec.precision.attention == "xformers" and spec.precision.mixed_precision == "bf16"
    assert (spec.dataset.max_token_length, spec.model.clip_skip) == (225, 2)
    assert len(spec.sample.prompts) == 2 and spec.sample.prompts[0].startswith("shiina mayuri")
    assert spec.sample.sampler == "k_euler_a" and spec.sample.every_n_epochs == 1
    assert "arbitrary Python class" in notes_about(notes, "--lr_scheduler_type")[0]
    assert notes_about(notes, "--lr_scheduler_args")
    assert "networks.lora does not read it" in notes_about(notes, "--network_args algo")[0]
    assert notes_about(notes, "--network_args use_reentrant")
    assert "Hugging Face" in notes_about(notes, "--huggingface_repo_id")[0]
    assert notes_about(notes, "--logging_dir") and notes_about(notes, "--gpu_ids")
    # --save_state with epochs and a remote dataset: steps per epoch unknown, explained.
    assert "steps per epoch are unknown" in notes_about(notes, "--save_state")[0]


def test_dataset_config_is_inlined_with_relative_image_dirs(tmp_path: Path) -> None:
    (tmp_path / "dataset.toml").write_text((FIXTURES / "dataset.toml").read_text())
    script = tmp_path / "train.sh"
    script.write_text('accelerate launch train_network.py --pretrained_model_name_or_path=model.safetensors '
                      '--dataset_config=dataset.toml --train_data_dir=/unused --network_module=networks.lora\n')
    spec, notes = convert(script.read_text(), base_dir=tmp_path)
    assert spec is not None, notes
    assert spec.dataset.uri == "/home/user/datasets/mayuri"
    doc = tomllib.loads(spec.dataset.config_toml or "")
    assert [s["image_dir"] for s in doc["datasets"][0]["subsets"]] == ["10_shiina mayuri", "1_nekochan"]
    assert doc["general"]["keep_tokens"] == 1  # everything else kept as written
    assert "--dataset_config wins" in notes_about(notes, "--train_data_dir")[0]


def test_save_state_epochs_become_steps_for_a_local_folder(tmp_path: Path) -> None:
    for folder, count in (("10_char", 3), ("2_style", 5)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "data" / folder / f"{i}.png").write_bytes(b"")
    text = ("accelerate launch train_network.py --pretrained_model_name_or_path=m --train_data_dir=data "
            "--network_module=networks.lora --train_batch_size=4 --gradient_accumulation_steps=2 "
            "--save_every_n_epochs=3 --save_state")
    spec, notes = convert(text, base_dir=tmp_path)
    assert spec is not None, notes
    # 10*3 + 2*5 = 40 image-steps per epoch; / batch 4 = 10 batches; / accumulation 2 = 5 updates; × 3 epochs
    assert spec.save.checkpoint_every_n_steps == 15
    assert "5 steps per epoch" in notes_about(notes, "--save_state")[0]
    assert spec.dataset.uri == "data"  # paths kept as given


def test_config_file_toml() -> None:
    text = """
[model_arguments]
pretrained_model_name_or_path = "s3://m/sd21-768-v.safetensors"
v2 = true
v_parameterization = true
[network_arguments]
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=lokr", "factor=8", "preset=attn-mlp", "use_cp=True"]
[optimizer_arguments]
optimizer_type = "prodigy"
learning_rate = 1.0
optimizer_args = ["decouple=True", "weight_decay=0.01", "d_coef=2"]
lr_scheduler = "constant"
[training_arguments]
train_data_dir = "s3://d/style"
resolution = "768,640"
max_train_epochs = 4
cache_latents = true
sdpa = true
save_precision = "float"
"""
    spec, notes = convert(text)
    assert spec is not None, notes
    assert (spec.model.arch, spec.model.v_parameterization) == ("sd2", True)
    assert (spec.network.algo, spec.network.factor, spec.network.preset, spec.network.use_tucker) == (
        "lokr", 8, "attn-mlp", True)
    assert spec.optimizer.type == "Prodigy" and spec.optimizer.args == {"decouple": True, "weight_decay": 0.01,
                                                                         "d_coef": 2}
    assert spec.dataset.resolution == [768, 640] and spec.save.save_precision == "fp32"
    assert notes_about(notes, "--network_args use_tucker") == [] and notes_about(notes, "--network_args use_cp")


def test_powershell_script_with_unresolved_expression() -> None:
    text = r"""
$ckpt = "D:\models\anything-v4.5.safetensors"
$image_dir = "D:\datasets\style"
$max_train_steps = 1600
$lr_warmup_ratio = 0.05
$lr_warmup_steps = [math]::Round($max_train_steps * $lr_warmup_ratio)
accelerate launch --num_cpu_threads_per_process 8 "$sd_scripts_dir\train_network.py" `
  --pretrained_model_name_or_path=$ckpt --train_data_dir=$image_dir `
  --network_module=networks.lora --max_train_steps=$max_train_steps `
  --lr_scheduler=cosine --lr_warmup_steps=$lr_warmup_steps --sdpa
"""
    spec, notes = convert(text)
    assert spec is not None, notes
    assert spec.model.uri == r"D:\models\anything-v4.5.safetensors"  # backslashes are not escapes here
    assert spec.dataset.uri == r"D:\datasets\style" and spec.training.max_train_steps == 1600
    assert spec.scheduler.warmup_steps == 0  # left out, and said so
    assert "could not be resolved" in notes_about(notes, "--lr_warmup_steps")[0]


def test_bash_array_of_arguments() -> None:
    text = """NAME=noob-v1s2400
args=(
    --pretrained_model_name_or_path="/models/noob.safetensors"  # base
    --train_data_dir=/data/$NAME
    --network_module=lycoris.kohya
    --network_args "algo=lokr" "factor=4"
)
run_training_script "/opt/sd-scripts/sdxl_train_network.py" "${args[@]}"
"""
    spec, notes = convert(text)
    assert spec is not None, notes
    assert spec.model.arch == "sdxl" and spec.dataset.uri == "/data/noob-v1s2400"
    assert (spec.network.algo, spec.network.factor) == ("lokr", 4)
    assert notes_about(notes, "run_training_script")  # an unknown launcher is named


def test_torch_compile_and_dynamo_backend_map_and_unknown_backends_are_named() -> None:
    base = ("accelerate launch sdxl_train_network.py --pretrained_model_name_or_path=m --train_data_dir=d "
            "--network_module=networks.lora --sdpa ")
    spec, notes = convert(base + "--torch_compile --dynamo_backend=aot_eager")
    assert spec is not None, notes
    assert (spec.precision.torch_compile, spec.precision.dynamo_backend) == (True, "aot_eager")
    spec, notes = convert(base + "--torch_compile --dynamo_backend tvm")
    assert spec is not None, notes
    assert (spec.precision.torch_compile, spec.precision.dynamo_backend) == (True, "inductor")
    assert any("tvm" in n and "inductor" in n for n in notes_about(notes, "--dynamo_backend"))
    # Without the flag the job gets Lathe's default, "auto" (compiled on CUDA where the adapter allows it).
    spec, _ = convert(base)
    assert spec is not None and spec.precision.torch_compile == "auto"


@pytest.mark.parametrize("text, reason", [
    ("echo hello", "no sd-scripts training command"),
    ("accelerate launch train_db.py --pretrained_model_name_or_path=m", "LoRA/LyCORIS networks only"),
    ("accelerate launch train_network.py --pretrained_model_name_or_path=m --train_data_dir=d "
     "--network_module=networks.oft", "not supported"),
    ("python train_network.py --pretrained_model_name_or_path=m --train_data_dir=d --network_module=networks.lora "
     "--optimizer_type=bitsandbytes.optim.PagedAdEMAMix8bit", "arbitrary optimizer classes are refused"),
    ("python sdxl_train_network.py --v2 --pretrained_model_name_or_path=m --train_data_dir=d", "refuses --v2"),
    ("[general]\nshuffle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", "dataset config"),
])
def test_refused_inputs_say_why(text: str, reason: str) -> None:
    spec, notes = convert(text)
    assert spec is None
    assert any(reason in n for n in notes), notes


def test_converted_spec_failing_the_checks_is_refused() -> None:
    text = ("python train_network.py --pretrained_model_name_or_path=m --train_data_dir=d --network_module=networks.lora"
            " --cache_text_encoder_outputs --shuffle_caption --network_train_unet_only")
    spec, notes = convert(text)
    assert spec is None
    assert any(n.startswith("spec check: precision.cache_text_encoder_outputs") for n in notes), notes


def test_cli_prints_only_json_on_stdout_and_exit_codes(tmp_path: Path) -> None:
    assert main([str(FIXTURES / "nope.sh")]) == 2
    out = subprocess.run([sys.executable, "-m", "trainer", "from-kohya", str(FIXTURES / "pony_sdxl_locon.sh")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    spec = decode_spec(out.stdout)  # stdout is the spec alone
    assert spec.model.arch == "sdxl"
    assert "block_dims" in out.stderr
    bad = tmp_path / "bad.sh"
    bad.write_text("accelerate launch train_db.py --x=1\n")
    out = subprocess.run([sys.executable, "-m", "trainer.core.fromkohya", str(bad)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "" and "no spec produced" in out.stderr
    assert json.loads(subprocess.run([sys.executable, "-m", "trainer.core.fromkohya", "-"], cwd=REPO, text=True,
                                     input=(FIXTURES / "sd15_character_lora.sh").read_text(), capture_output=True,
                                     timeout=60).stdout)["network"]["module"] == "networks.lora"
