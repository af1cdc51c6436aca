"""JobSpec v1: example specs decode, errors name the field path, cross-field rules, no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.core import spec as spec_module
from trainer.core.spec import (
    BLOCK_COUNTS,
    DEFAULT_MAX_TRAIN_STEPS,
    JobSpec,
    SpecError,
    check_spec,
    decode_spec,
    encode_spec,
    spec_from_obj,
    total_steps,
    warmup_steps,
    warnings_for,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_FILES = sorted(
    p for folder in (REPO / "examples", REPO / "deploy" / "examples") if folder.is_dir()
    for p in folder.rglob("*") if p.suffix in (".json", ".toml")
)
DOCS = REPO / "docs" / "spec.md"


def read_spec(path: Path) -> JobSpec:
    return decode_spec(path.read_bytes(), format="toml" if path.suffix == ".toml" else "json")


def minimal(**sections: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"version": 1, "model": {"uri": "s3://models/sd15"}, "dataset": {"uri": "s3://data/x"}}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(obj.get(name), dict):
            obj[name] = {**obj[name], **value}
        else:
            obj[name] = value
    return obj


def problems_of(obj: Any) -> list[spec_module.Problem]:
    with pytest.raises(SpecError) as info:
        decode_spec(json.dumps(obj))
    assert info.value.problems, "a SpecError always carries at least one problem"
    return info.value.problems


def only_problem(obj: Any) -> spec_module.Problem:
    problems = problems_of(obj)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------------------------
# Examples and formats


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLE_FILES}
    assert {"sd15-character-lora.json", "sd15-character-lora.toml", "sdxl-pony-locon.toml",
            "sd2-vpred.json"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_decodes_and_checks(path: Path) -> None:
    spec = read_spec(path)
    assert spec.version == 1
    assert not [p for p in check_spec(spec) if p.severity == "error"]
    # The stored form decodes back to the same spec.
    assert decode_spec(encode_spec(spec)) == spec


def test_examples_cover_the_three_architectures() -> None:
    archs = {read_spec(p).model.arch for p in EXAMPLE_FILES if p.parent.name == "examples"}
    assert {"sd1", "sd2", "sdxl"} <= archs
    sd2 = read_spec(REPO / "examples" / "sd2-vpred.json")
    assert sd2.model.v_parameterization and sd2.model.arch == "sd2"
    pony = read_spec(REPO / "examples" / "sdxl-pony-locon.toml")
    assert (pony.network.module, pony.network.algo, pony.dataset.bucket_reso_steps) == ("lycoris.kohya", "locon", 32)


def test_json_and_toml_give_the_same_spec() -> None:
    from_json = read_spec(REPO / "examples" / "sd15-character-lora.json")
    from_toml = read_spec(REPO / "examples" / "sd15-character-lora.toml")
    assert from_json == from_toml
    assert encode_spec(from_json) == encode_spec(from_toml)


def test_format_is_detected_from_content() -> None:
    toml_text = 'version = 1\n[model]\nuri = "m"\n[dataset]\nuri = "d"\n'
    assert decode_spec(toml_text) == decode_spec(json.dumps(minimal(model={"uri": "m"}, dataset={"uri": "d"})))
    assert decode_spec(toml_text.encode()) == decode_spec(toml_text, format="toml")


def test_defaults_are_sd_scripts_defaults() -> None:
    spec = decode_spec(json.dumps(minimal()))
    assert spec.optimizer.type == "AdamW" and spec.optimizer.learning_rate == 2e-6
    assert spec.optimizer.max_grad_norm == 1.0
    assert spec.scheduler.type == "constant" and spec.scheduler.num_cycles == 1 and spec.scheduler.power == 1.0
    assert spec.network.dim == 4 and spec.network.alpha == 1.0
    assert spec.dataset.caption_extension == ".caption" and spec.dataset.caption_separator == ","
    assert (spec.dataset.min_bucket_reso, spec.dataset.max_bucket_reso, spec.dataset.bucket_reso_steps) == (256, 1024, 64)
    assert spec.dataset.max_data_loader_n_workers == 8 and spec.dataset.dataset_repeats == 1
    assert spec.noise.multires_noise_discount == 0.3
    assert spec.precision.mixed_precision == "no" and spec.training.batch_size == 1
    assert total_steps(spec, steps_per_epoch=37) == DEFAULT_MAX_TRAIN_STEPS == 1600


def test_epochs_win_and_warmup_ratio() -> None:
    spec = decode_spec(json.dumps(minimal(training={"max_train_steps": 10, "max_train_epochs": 3},
                                          scheduler={"type": "cosine", "warmup_steps": 0.1})))
    assert total_steps(spec, steps_per_epoch=40) == 120
    assert warmup_steps(spec, 120) == 12
    assert [p.path for p in warnings_for(spec)] == ["training.max_train_steps"]


def test_cache_to_disk_implies_cache_as_in_sd_scripts() -> None:
    spec = decode_spec(json.dumps(minimal(precision={"cache_latents_to_disk": True})))
    assert spec.precision.cache_latents is True
    # …and so the latent-cache rules apply.
    problem = only_problem(minimal(precision={"cache_latents_to_disk": True}, dataset={"color_aug": True}))
    assert problem.path == "precision.cache_latents"


# ---------------------------------------------------------------------------------------------
# Decoding errors: each names the field path and says what to do


def test_unknown_version_lists_supported() -> None:
    problem = only_problem(minimal(version=2))
    assert problem.path == "version" and "supported versions: [1]" in problem.message
    assert "supported" in only_problem({"model": {"uri": "m"}}).message  # missing version
    assert only_problem(minimal(version=True)).path == "version"


def test_wrong_type_names_the_path() -> None:
    problem = only_problem(minimal(training={"batch_size": "8"}))
    assert problem.path == "training.batch_size" and "Expected `int`" in problem.message


def test_out_of_range_names_the_path() -> None:
    problem = only_problem(minimal(dataset={"caption_dropout_rate": 1.5}))
    assert problem.path == "dataset.caption_dropout_rate" and "<= 1.0" in problem.message


def test_enum_lists_allowed_values() -> None:
    problem = only_problem(minimal(optimizer={"type": "adamw"}))
    assert problem.path == "optimizer.type"
    assert "'AdamW'" in problem.message and "'Prodigy'" in problem.message


def test_list_item_path() -> None:
    problem = only_problem(minimal(dataset={"subsets": [{"image_dir": "1_a"}, {"image_dir": "2_b", "num_repeats": 0}]}))
    assert problem.path == "dataset.subsets[1].num_repeats"


def test_unknown_field_top_level_and_nested() -> None:
    top = only_problem(minimal(gpu=1))
    assert top.path == "gpu" and "allowed fields here" in top.message and "resources" in top.message
    nested = only_problem(minimal(network={"rank": 8}))
    assert nested.path == "network.rank" and "dim" in nested.message
    deep = only_problem(minimal(dataset={"subsets": [{"image_dir": "1_a", "repeats": 3}]}))
    assert deep.path == "dataset.subsets[0].repeats" and "num_repeats" in deep.message


def test_sd_scripts_flag_names_point_to_the_field() -> None:
    problem = only_problem(minimal(network_dim=8))
    assert problem.path == "network_dim" and "network.dim" in problem.message
    refused = only_problem(minimal(scheduler={"lr_scheduler_type": "torch.optim.lr_scheduler.StepLR"}))
    assert refused.path == "scheduler.lr_scheduler_type" and "arbitrary Python class" in refused.message


def test_missing_required_field() -> None:
    obj = minimal()
    del obj["dataset"]
    problem = only_problem(obj)
    assert problem.path == "dataset" and "missing" in problem.message
    nested = only_problem(minimal(model={"arch": "sdxl", "uri": None}))
    assert nested.path == "model.uri"
    assert only_problem({"version": 1, "model": {}, "dataset": {"uri": "d"}}).path == "model.uri"


def test_not_an_object_and_bad_syntax() -> None:
    assert only_problem([1, 2]).path == "(root)"
    with pytest.raises(SpecError, match="not valid JSON"):
        decode_spec("{ nope")
    with pytest.raises(SpecError, match="not valid TOML"):
        decode_spec("version = = 1")
    with pytest.raises(SpecError, match="not UTF-8"):
        decode_spec(b"\xff\xfe{")


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(SpecError) as info:
        decode_spec('{"version": 1, "model": {"uri": "m"}, "dataset": {"uri": "d"}, "optimizer": {"learning_rate": NaN}}')
    assert info.value.problems[0].path == "optimizer.learning_rate"
    with pytest.raises(SpecError) as info:
        decode_spec('version = 1\n[model]\nuri = "m"\n[dataset]\nuri = "d"\n[network]\nalpha = inf\n')
    assert info.value.problems[0].path == "network.alpha"


# ---------------------------------------------------------------------------------------------
# Cross-field rules: one case per rule, the path and the advice


CROSS_FIELD_ERRORS = [
    ("te-cache+shuffle", dict(precision={"cache_text_encoder_outputs": True}, network={"train_unet_only": True},
                              dataset={"shuffle_caption": True}), "precision.cache_text_encoder_outputs", "shuffle_caption"),
    ("te-cache+dropout", dict(precision={"cache_text_encoder_outputs": True}, network={"train_unet_only": True},
                              dataset={"caption_dropout_rate": 0.1}), "precision.cache_text_encoder_outputs", "dropout"),
    ("te-cache+te-training", dict(precision={"cache_text_encoder_outputs": True}),
     "precision.cache_text_encoder_outputs", "train_unet_only"),
    ("latents+color_aug", dict(precision={"cache_latents": True}, dataset={"color_aug": True}),
     "precision.cache_latents", "color_aug"),
    ("latents+random_crop", dict(precision={"cache_latents": True}, dataset={"random_crop": True}),
     "precision.cache_latents", "random_crop"),
    ("adafactor-scheduler", dict(scheduler={"type": "adafactor"}), "scheduler.type", "Adafactor"),
    ("constant+warmup", dict(scheduler={"type": "constant", "warmup_steps": 10}), "scheduler.warmup_steps",
     "constant_with_warmup"),
    ("networks.lora+loha", dict(network={"module": "networks.lora", "algo": "loha"}), "network.algo", "lycoris.kohya"),
    ("block_dims-under-lycoris", dict(network={"block_dims": [4] * 25}), "network.block_dims", "networks.lora"),
    ("block_dims-length-sd1", dict(network={"module": "networks.lora", "block_dims": [4] * 23}),
     "network.block_dims", "exactly 25"),
    ("block_dims-length-sdxl", dict(model={"arch": "sdxl"}, dataset={"bucket_reso_steps": 32},
                                    network={"module": "networks.lora", "block_dims": [4] * 25}),
     "network.block_dims", "exactly 23"),
    ("conv_block_alphas-length", dict(network={"module": "networks.lora", "conv_block_dims": [4] * 25,
                                               "conv_block_alphas": [1.0] * 3}), "network.conv_block_alphas", "exactly 25"),
    ("block_alphas-without-dims", dict(network={"module": "networks.lora", "block_alphas": [1.0] * 25}),
     "network.block_alphas", "block_dims"),
    ("conv_block_alphas-without-dims", dict(network={"module": "networks.lora", "conv_block_alphas": [1.0] * 25}),
     "network.conv_block_alphas", "conv_block_dims"),
    ("nothing-to-train", dict(network={"train_unet_only": True, "train_text_encoder_only": True}),
     "network.train_text_encoder_only", "nothing to train"),
    ("lokr-factor-0", dict(network={"algo": "lokr", "factor": 0}), "network.factor", "-1"),
    ("te-lr-two-values-sd1", dict(optimizer={"text_encoder_lr": [1e-4, 5e-5]}), "optimizer.text_encoder_lr", "one value"),
    ("adaptive-noise-without-offset", dict(noise={"adaptive_noise_scale": 0.01}), "noise.adaptive_noise_scale",
     "noise_offset"),
    ("full_fp16-without-fp16", dict(precision={"full_fp16": True}), "precision.full_fp16", "fp16"),
    ("full_bf16-without-bf16", dict(precision={"full_bf16": True}), "precision.full_bf16", "bf16"),
    ("resolution-not-multiple-of-8", dict(dataset={"resolution": [512, 500]}), "dataset.resolution", "multiples of 8"),
    ("min-bucket-above-max", dict(dataset={"enable_bucket": True, "resolution": 256, "min_bucket_reso": 512,
                                           "max_bucket_reso": 256}), "dataset.min_bucket_reso", "max_bucket_reso"),
    ("max-bucket-below-resolution", dict(dataset={"enable_bucket": True, "resolution": 1024, "max_bucket_reso": 768}),
     "dataset.max_bucket_reso", "raise it"),
    ("config_toml+subsets", dict(dataset={"config_toml": "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '1_a'\n",
                                         "subsets": [{"image_dir": "1_a"}]}),
     "dataset.subsets", "not both"),
    ("timesteps", dict(training={"min_timestep": 500, "max_timestep": 400}), "training.min_timestep", "below"),
    ("save_last_n_epochs-alone", dict(save={"save_last_n_epochs": 3}), "save.save_last_n_epochs", "save_every_n_epochs"),
    ("save_last_n_steps-alone", dict(save={"save_last_n_steps": 300}), "save.save_last_n_steps", "save_every_n_steps"),
    ("shrink-rank-and-method", dict(shrink={"rank": 8, "method": "sv_fro", "param": 0.9}), "shrink.rank", "either"),
    ("shrink-method-without-param", dict(shrink={"method": "sv_ratio"}), "shrink.param", "needs"),
    ("shrink-sv_ratio-below-1", dict(shrink={"method": "sv_ratio", "param": 0.5}), "shrink.param", "≥ 1"),
    ("shrink-sv_fro-above-1", dict(shrink={"method": "sv_fro", "param": 2.0}), "shrink.param", "(0, 1]"),
    ("shrink-nothing", dict(shrink={"recipe": None}), "shrink.recipe", "shrink.enabled = false"),
    ("sample-bad-number", dict(sample={"prompts": ["a cat --w wide"]}), "sample.prompts[0]", "number"),
    ("sample-empty-prompt", dict(sample={"prompts": ["--w 512"]}), "sample.prompts[0]", "empty"),
    ("sample-size", dict(sample={"prompts": ["a cat --w 500"]}), "sample.prompts[0]", "multiples of 8"),
    ("multinode-cpu", dict(resources={"nodes": 2, "gpus": 0}), "resources.nodes", "gpus"),
    # What the trainer checks without a model, checked here too so that submit refuses it.
    ("optimizer-arg-unknown", dict(optimizer={"args": {"decouple": True}}), "optimizer.args.decouple",
     "not an argument of AdamW; it takes: amsgrad, betas"),
    ("optimizer-arg-of-another-optimizer", dict(optimizer={"type": "Lion", "args": {"eps": 1e-8}}),
     "optimizer.args.eps", "not an argument of Lion"),
    ("optimizer-arg-fixed", dict(optimizer={"type": "SGDNesterov", "args": {"nesterov": False}}),
     "optimizer.args.nesterov", "set by SGDNesterov itself"),
    ("polynomial-lr-at-its-end", dict(scheduler={"type": "polynomial"}, optimizer={"learning_rate": 1e-8}),
     "optimizer.learning_rate", "decays to 1e-7"),
    ("shrink-param-without-method", dict(shrink={"rank": 4, "param": 0.9}), "shrink.param", "only used with"),
    ("shrink-recipe-unknown-key", dict(shrink={"recipe": "frob=1,thr=-3"}), "shrink.recipe", "unknown key 'frob'"),
    ("shrink-recipe-no-threshold", dict(shrink={"recipe": "fro_ckpt=1"}), "shrink.recipe", "thr=X"),
    ("config-toml-not-toml", dict(dataset={"config_toml": "[[datasets]\n"}), "dataset.config_toml", "not valid TOML"),
    ("config-toml-unknown-key", dict(dataset={"config_toml": "[[datasets]]\nbogus = 1\n[[datasets.subsets]]\n"
                                                             "image_dir = 'a'\n"}), "dataset.config_toml",
     "unknown key 'bogus'"),
    ("subset-dir-climbs-out", dict(dataset={"subsets": [{"image_dir": "../other"}]}),
     "dataset.subsets[0].image_dir", "must be a folder inside the dataset"),
]


@pytest.mark.parametrize("sections, path, advice", [c[1:] for c in CROSS_FIELD_ERRORS],
                         ids=[c[0] for c in CROSS_FIELD_ERRORS])
def test_cross_field_rule(sections: dict[str, Any], path: str, advice: str) -> None:
    problems = problems_of(minimal(**sections))
    assert {p.path for p in problems} == {path}, problems
    assert advice in problems[0].message


def test_adafactor_with_its_own_schedule_may_take_any_learning_rate_with_polynomial() -> None:
    decode_spec(json.dumps(minimal(optimizer={"type": "Adafactor", "learning_rate": 0.0},
                                   scheduler={"type": "polynomial"})))
    problems = problems_of(minimal(optimizer={"type": "Adafactor", "learning_rate": 0.0,
                                              "args": {"relative_step": False}}, scheduler={"type": "polynomial"}))
    assert [p.path for p in problems] == ["optimizer.learning_rate"]


def test_every_argument_the_trainer_takes_passes_the_spec_check() -> None:
    from trainer.core.optimizers import OPTIMIZERS

    assert set(OPTIMIZERS) == set(get_args(spec_module.OptimizerType))
    for kind, entry in OPTIMIZERS.items():
        args = {name: 1 for name in entry.user_args}
        spec = decode_spec(json.dumps(minimal(optimizer={"type": kind, "args": args})))
        assert set(spec.optimizer.args) == set(entry.args) - set(entry.fixed)


def test_a_recipe_is_not_parsed_when_another_rule_or_no_shrink_applies() -> None:
    for shrink in ({"rank": 4, "recipe": "nonsense"}, {"enabled": False, "recipe": "nonsense"}):
        decode_spec(json.dumps(minimal(shrink=shrink)))
    decode_spec(json.dumps(minimal(network={"algo": "ia3"}, shrink={"recipe": "nonsense"})))  # warned: not shrunk


# ---------------------------------------------------------------------------------------------
# Every problem in one answer


def test_every_bad_field_is_reported_not_only_the_first() -> None:
    problems = problems_of(minimal(network={"dim": 0}, optimizer={"learning_rate": -1}))
    assert [p.path for p in problems] == ["network.dim", "optimizer.learning_rate"], problems
    assert ">= 1" in problems[0].message and ">= 0.0" in problems[1].message


def test_every_problem_at_every_depth_in_one_pass() -> None:
    obj = minimal(
        model={"arch": "sd3"},
        dataset={"resolution": [16, "x"], "subsets": [{"image_dir": "a", "num_repeats": 0}, {"image_dir": "b", "rep": 1}]},
        network={"dim": 0, "alpha": float("inf"), "block_dims": [2**64, 0]},
        optimizer={"args": {"eps": float("nan"), "betas": {"a": 1}, "weight_decay": "x" * 5000}},
        epochs=3,
    )
    del obj["model"]["uri"]
    paths = [p.path for p in problems_of(obj)]
    assert sorted(paths) == sorted([
        "network.alpha", "network.block_dims[0]", "optimizer.args.eps",  # values no field can hold
        "model.arch", "model.uri", "dataset.resolution[0]", "dataset.resolution[1]",
        "dataset.subsets[0].num_repeats", "dataset.subsets[1].rep", "network.dim", "network.block_dims[1]",
        "optimizer.args.betas", "optimizer.args.weight_decay", "epochs",
    ]), paths


def test_cross_field_rules_run_once_every_field_is_valid() -> None:
    """The cross-field rules read a whole JobSpec: with a bad field there is none to read yet."""
    problems = problems_of(minimal(network={"dim": 0}, precision={"full_fp16": True}))
    assert [p.path for p in problems] == ["network.dim"]


CROSS_FIELD_WARNINGS = [
    ("prodigy-low-lr", dict(optimizer={"type": "Prodigy", "learning_rate": 1e-4}), "optimizer.learning_rate"),
    ("v-pred-on-sd1", dict(model={"v_parameterization": True}), "model.v_parameterization"),
    ("sd2-clip-skip", dict(model={"arch": "sd2", "clip_skip": 2}), "model.clip_skip"),
    ("bucket-steps-sdxl", dict(model={"arch": "sdxl"}, dataset={"enable_bucket": True, "bucket_reso_steps": 16}),
     "dataset.bucket_reso_steps"),
    ("bucket-steps-sd1", dict(dataset={"enable_bucket": True, "bucket_reso_steps": 32}), "dataset.bucket_reso_steps"),
    ("lycoris-option-under-networks.lora", dict(network={"module": "networks.lora", "use_tucker": True}),
     "network.use_tucker"),
    ("keep_tokens-without-shuffle", dict(dataset={"keep_tokens": 1}), "dataset.keep_tokens"),
    ("fp16-save", dict(save={"save_precision": "fp16"}), "save.save_precision"),
    ("prompts-without-interval", dict(sample={"prompts": ["a cat"]}), "sample.prompts"),
]


@pytest.mark.parametrize("sections, path", [c[1:] for c in CROSS_FIELD_WARNINGS],
                         ids=[c[0] for c in CROSS_FIELD_WARNINGS])
def test_cross_field_warning(sections: dict[str, Any], path: str) -> None:
    spec = decode_spec(json.dumps(minimal(**sections)))  # warnings never refuse a spec
    assert path in [p.path for p in warnings_for(spec)]


def test_block_counts_match_sd_scripts_networks_lora() -> None:
    # networks/lora.py: SD1/2 NUM_OF_BLOCKS=12 → 12*2 + 1 mid; SDXL 1 + 9*2 + 3 mid + 1 out.
    assert BLOCK_COUNTS == {"sd1": 12 * 2 + 1, "sd2": 12 * 2 + 1, "sdxl": 1 + 9 * 2 + 3 + 1}
    ok = decode_spec(json.dumps(minimal(model={"arch": "sdxl"}, dataset={"bucket_reso_steps": 32},
                                        network={"module": "networks.lora", "block_dims": [8] * 23,
                                                 "block_alphas": [4.0] * 23})))
    assert ok.network.block_dims == [8] * 23


# ---------------------------------------------------------------------------------------------
# Properties


SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
           | st.text(alphabet="ab1.,-_ /sdxl", max_size=6))
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(alphabet="abuv", max_size=4), children,
                                                                       max_size=3),
    max_leaves=8,
)
FIELD_NAMES = sorted({name for struct in (JobSpec, *[f.type for f in msgspec.structs.fields(JobSpec)
                                                     if isinstance(f.type, type)])
                      for name in getattr(struct, "__struct_fields__", ())})
# Plausible values under real field names reach deep into the validation and the cross-field rules.
VALUES = SCALARS | st.lists(SCALARS, max_size=3)
SECTION = st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=3)
NEAR_SPECS = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1", None]),
     "model": st.fixed_dictionaries({"uri": st.just("m")}, optional={"arch": st.sampled_from(["sd1", "sdxl", "x"])}),
     "dataset": st.fixed_dictionaries({"uri": st.just("d")}, optional={"resolution": VALUES})},
    optional={name: SECTION for name in ("network", "optimizer", "scheduler", "training", "precision", "sample")},
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSONISH, NEAR_SPECS))
def test_fuzz_decode_raises_only_spec_error(obj: Any) -> None:
    try:
        text = json.dumps(obj)
    except ValueError:
        return
    try:
        spec = decode_spec(text)
    except SpecError as exc:
        assert exc.problems and all(p.path and p.message for p in exc.problems)
        return
    assert isinstance(spec, JobSpec)


def test_import_does_not_load_torch() -> None:
    code = ("import sys, trainer.core.spec, trainer.core.fromkohya; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'lycoris', 'accelerate') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_docs_cover_every_field() -> None:
    text = DOCS.read_text(encoding="utf-8")
    missing = []
    for section in msgspec.structs.fields(JobSpec):
        if isinstance(section.type, type) and issubclass(section.type, msgspec.Struct):
            missing += [f"{section.name}.{f}" for f in section.type.__struct_fields__
                        if f"`{section.name}.{f}`" not in text]
        elif f"`{section.name}`" not in text:
            missing.append(section.name)
    missing += [f"dataset.subsets[].{f}" for f in spec_module.SubsetSpec.__struct_fields__
                if f"`subsets[].{f}`" not in text]
    assert not missing, f"docs/spec.md does not describe: {missing}"


@pytest.mark.parametrize("algo", ["ia3", "glora", "boft", "diag-oft"])
def test_shrinking_an_adapter_with_no_low_rank_form_is_a_warning_not_a_lost_run(algo: str) -> None:
    spec = decode_spec(json.dumps(minimal(network={"algo": algo})))
    warnings = [p for p in warnings_for(spec) if p.path == "shrink.enabled"]
    assert warnings and "skipped" in warnings[0].message
    off = decode_spec(json.dumps(minimal(network={"algo": algo}, shrink={"enabled": False})))
    assert not [p for p in warnings_for(off) if p.path.startswith("shrink.")]


def test_recipe_against_a_ckpt_base_warns_and_names_the_alternative() -> None:
    spec = decode_spec(json.dumps(minimal(model={"uri": "s3://models/sd15.ckpt"})))
    [warning] = [p for p in warnings_for(spec) if p.path == "shrink.recipe"]
    assert "shrink.rank" in warning.message


def test_torch_compile_without_a_gpu_is_a_warning() -> None:
    on_cpu = decode_spec(json.dumps(minimal(precision={"torch_compile": True}, resources={"gpus": 0})))
    assert [p.path for p in warnings_for(on_cpu)] == ["precision.torch_compile"]
    on_gpu = decode_spec(json.dumps(minimal(precision={"torch_compile": True}, resources={"gpus": 1})))
    assert not [p for p in warnings_for(on_gpu) if p.path == "precision.torch_compile"]


def test_shared_memory_must_fit_in_the_memory_limit() -> None:
    base = {"version": 1, "model": {"uri": "s3://m/sd15"}, "dataset": {"uri": "s3://d/cats"}}
    with pytest.raises(SpecError, match=r"resources.shm_size: 16Gi is not below resources.memory \(16Gi\)"):
        spec_from_obj({**base, "resources": {"memory": "16Gi"}})
    assert spec_from_obj({**base, "resources": {"memory": "17179869185", "shm_size": "16Gi"}})  # a byte more
    assert spec_from_obj({**base, "resources": {"memory": "8Gi", "shm_size": "2Gi"}})


def test_torch_compile_is_auto_true_or_false() -> None:
    """"auto" (the default) compiles on CUDA for the adapters that trace into one graph and never on CPU;
    true and false (old specs' booleans) keep their meaning; anything else is refused by name."""
    from trainer.core.spec import compile_choice

    auto = decode_spec(json.dumps(minimal(resources={"gpus": 1}, network={"module": "networks.lora"})))
    assert auto.precision.torch_compile == "auto"
    assert not [p for p in warnings_for(auto) if p.path == "precision.torch_compile"]
    assert compile_choice(auto, cuda=True).on and compile_choice(auto, cuda=True).fullgraph
    assert not compile_choice(auto, cuda=False).on
    for algo, clean in (("lora", True), ("locon", True), ("loha", False), ("lokr", False)):
        spec = decode_spec(json.dumps(minimal(network={"module": "lycoris.kohya", "algo": algo})))
        choice = compile_choice(spec, cuda=True)
        assert choice.on is clean and (choice.warning is None) is clean, algo
        if not clean:
            assert algo in choice.warning and "eager" in choice.warning
    forced = decode_spec(json.dumps(minimal(precision={"torch_compile": True}, network={"algo": "loha"})))
    assert forced.precision.torch_compile is True
    assert compile_choice(forced, cuda=False).on and not compile_choice(forced, cuda=False).fullgraph
    off = decode_spec(json.dumps(minimal(precision={"torch_compile": False})))
    assert off.precision.torch_compile is False and not compile_choice(off, cuda=True).on
    with pytest.raises(SpecError, match="torch_compile"):
        decode_spec(json.dumps(minimal(precision={"torch_compile": "yes"})))
