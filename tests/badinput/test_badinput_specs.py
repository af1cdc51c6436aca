"""Bad specs through the HTTP API: wrong types, out-of-range values, unknown fields, oversized strings,
wrong block_dims lengths, conflicting options, URIs outside the tenant's prefixes, unsupported
architectures and tenant limits. Each case is sent to POST /v1/jobs and POST /v1/jobs:validate and must
come back as the expected 4xx problem naming the field, with nothing stored changed."""

from __future__ import annotations

from typing import Any

import pytest

from tests.badinput.badinput_helpers import auth, check_problem, problem_paths, spec

B = "{bucket}"  # replaced by the session's bucket
BIG = 10**30

# (id, changes to the valid spec, status, field path the problems must name, words the message must hold)
SPEC_CASES: list[tuple[str, dict[str, Any], int, str, str]] = [
    # versions and shape
    ("version-missing", {"version": None}, 422, "version", "required"),
    ("version-string", {"version": "1"}, 422, "version", "unsupported spec version"),
    ("version-bool", {"version": True}, 422, "version", "unsupported spec version"),
    ("version-future", {"version": 2}, 422, "version", "supported versions"),
    ("model-missing", {"model": None}, 422, "model", "required"),
    ("model-not-object", {"model": "s3://x"}, 422, "model", "Expected `object"),
    ("dataset-uri-missing", {"dataset.uri": None}, 422, "dataset.uri", "required"),
    # wrong types
    ("dim-string", {"network.dim": "8"}, 422, "network.dim", "Expected `int`"),
    ("dim-float", {"network.dim": 1.5}, 422, "network.dim", "Expected `int`"),
    ("steps-bool", {"training.max_train_steps": True}, 422, "training.max_train_steps", "Expected `int"),
    ("lr-string", {"optimizer.learning_rate": "1e-4"}, 422, "optimizer.learning_rate", "Expected `float`"),
    ("flip-int", {"dataset.flip_aug": 1}, 422, "dataset.flip_aug", "Expected `bool`"),
    ("prompts-string", {"sample.prompts": "a cat"}, 422, "sample.prompts", "Expected `array`"),
    ("args-nested-object", {"optimizer.args": {"betas": {"a": 1}}}, 422, "optimizer.args", "Expected"),
    # out of range
    ("dim-zero", {"network.dim": 0}, 422, "network.dim", ">= 1"),
    ("dim-negative", {"network.dim": -4}, 422, "network.dim", ">= 1"),
    ("alpha-zero", {"network.alpha": 0}, 422, "network.alpha", "> 0"),
    ("dropout-above-one", {"network.dropout": 1.5}, 422, "network.dropout", "<= 1"),
    ("batch-zero", {"training.batch_size": 0}, 422, "training.batch_size", ">= 1"),
    ("batch-huge-int", {"training.batch_size": BIG}, 422, "training.batch_size", "64 bits"),
    ("seed-over-64-bits", {"training.seed": 2**64}, 422, "training.seed", "64 bits"),
    ("clip-skip-zero", {"model.clip_skip": 0}, 422, "model.clip_skip", ">= 1"),
    ("resolution-too-small", {"dataset.resolution": 16}, 422, "dataset.resolution", ">= 32"),
    ("resolution-not-multiple-of-8", {"dataset.resolution": 100}, 422, "dataset.resolution", "multiples of 8"),
    ("resolution-one-value-list", {"dataset.resolution": [512]}, 422, "dataset.resolution", "length >= 2"),
    ("timestep-too-high", {"training.max_timestep": 5000}, 422, "training.max_timestep", "<= 1000"),
    ("timesteps-inverted", {"training.min_timestep": 900, "training.max_timestep": 100}, 422,
     "training.min_timestep", "below training.max_timestep"),
    ("gpus-above-16", {"resources.gpus": 17}, 422, "resources.gpus", "<= 16"),
    ("shm-size-pattern", {"resources.shm_size": "16 GB; rm -rf /"}, 422, "resources.shm_size", "regex"),
    ("te-lr-three-values", {"optimizer.text_encoder_lr": [1e-5, 1e-5, 1e-5]}, 422, "optimizer.text_encoder_lr",
     "length <= 2"),
    ("sample-size-option", {"sample.prompts": ["a cat --w abc"]}, 422, "sample.prompts[0]", "--w"),
    # unknown and refused fields
    ("unknown-top-level", {"epochs": 3}, 422, "epochs", "unknown field"),
    ("unknown-nested", {"network.network_dim": 8}, 422, "network.network_dim", "unknown field"),
    ("kohya-flag-name", {"optimizer_type": "AdamW"}, 422, "optimizer_type", "optimizer.type"),
    ("code-by-name-refused", {"lr_scheduler_type": "evil.module.Scheduler"}, 422, "lr_scheduler_type", "refuses"),
    # oversized strings
    ("name-oversized", {"name": "n" * 10_000}, 422, "name", "length <= 200"),
    ("model-uri-oversized", {"model.uri": f"s3://{B}/models/" + "m" * 5000}, 422, "model.uri", "length <= 2048"),
    ("output-name-slash", {"save.output_name": "../../etc/passwd"}, 422, "save.output_name", "regex"),
    ("output-name-nul", {"save.output_name": "a\x00b"}, 422, "save.output_name", "regex"),
    ("prompt-oversized", {"sample.prompts": ["x" * 5000]}, 422, "sample.prompts[0]", "length <= 4000"),
    ("class-tokens-oversized", {"dataset.subsets": [{"image_dir": "2_cat", "class_tokens": "c" * 1_000_000}]}, 422,
     "dataset.subsets[0].class_tokens", "length <= 4000"),
    ("config-toml-oversized", {"dataset.config_toml": "#" * 300_000}, 422, "dataset.config_toml", "length <="),
    ("caption-extension-oversized", {"dataset.caption_extension": "." + "t" * 100}, 422,
     "dataset.caption_extension", "length <= 64"),
    ("optimizer-arg-oversized", {"optimizer.args": {"k": "v" * 5000}}, 422, "optimizer.args", "length <= 4000"),
    # nesting and non-finite numbers
    ("nested-too-deep", {"optimizer.args": {"x": [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}}, 422, "optimizer.args.x",
     "nested more than"),
    # wrong block_dims lengths
    ("block-dims-sd1-length", {"network.module": "networks.lora", "network.block_dims": [4] * 10}, 422,
     "network.block_dims", "exactly 25"),
    ("block-dims-sdxl-length", {"model.arch": "sdxl", "network.module": "networks.lora", "network.block_dims": [4] * 25,
                                "dataset.resolution": 1024}, 422, "network.block_dims", "exactly 23"),
    ("block-dims-with-lycoris", {"network.block_dims": [4] * 25}, 422, "network.block_dims", "networks.lora"),
    ("block-alphas-without-dims", {"network.module": "networks.lora", "network.block_alphas": [1.0] * 25}, 422,
     "network.block_alphas", "needs network.block_dims"),
    ("block-dims-oversized-list", {"network.module": "networks.lora", "network.block_dims": [4] * 10_000}, 422,
     "network.block_dims", "length <= 64"),
    # conflicting options
    ("te-cache-with-shuffle", {"precision.cache_text_encoder_outputs": True, "dataset.shuffle_caption": True,
                               "network.train_unet_only": True}, 422, "precision.cache_text_encoder_outputs",
     "shuffle_caption"),
    ("latent-cache-with-color-aug", {"precision.cache_latents": True, "dataset.color_aug": True}, 422,
     "precision.cache_latents", "color_aug"),
    ("full-fp16-without-fp16", {"precision.full_fp16": True}, 422, "precision.full_fp16", "mixed_precision"),
    ("nothing-to-train", {"network.train_unet_only": True, "network.train_text_encoder_only": True}, 422,
     "network.train_text_encoder_only", "nothing to train"),
    ("lora-module-with-loha", {"network.module": "networks.lora", "network.algo": "loha"}, 422, "network.algo",
     "lycoris.kohya"),
    ("shrink-rank-and-method", {"shrink.rank": 4, "shrink.method": "sv_fro", "shrink.param": 0.9}, 422,
     "shrink.rank", "not both"),
    ("toml-and-subsets", {"dataset.config_toml": "[[datasets]]\n", "dataset.subsets": [{"image_dir": "2_cat"}]}, 422,
     "dataset.subsets", "not both"),
    ("constant-scheduler-warmup", {"scheduler.warmup_steps": 10}, 422, "scheduler.warmup_steps", "warmup"),
    ("adafactor-scheduler-adamw", {"scheduler.type": "adafactor"}, 422, "scheduler.type", "Adafactor"),
    # what the trainer would refuse without a model, refused at submit
    ("optimizer-arg-unknown", {"optimizer.args": {"decouple": True}}, 422, "optimizer.args.decouple",
     "not an argument of AdamW"),
    ("optimizer-arg-of-another-optimizer", {"optimizer.type": "Prodigy", "optimizer.learning_rate": 1.0,
                                            "optimizer.args": {"amsgrad": True}}, 422, "optimizer.args.amsgrad",
     "not an argument of Prodigy"),
    ("optimizer-arg-misspelt", {"optimizer.args": {"weight_decy": 0.01}}, 422, "optimizer.args.weight_decy",
     "weight_decay"),
    ("optimizer-arg-fixed", {"optimizer.type": "SGDNesterov", "optimizer.args": {"nesterov": False}}, 422,
     "optimizer.args.nesterov", "cannot be changed"),
    ("polynomial-lr-at-its-end", {"scheduler.type": "polynomial", "optimizer.learning_rate": 1e-8}, 422,
     "optimizer.learning_rate", "decays to 1e-7"),
    ("shrink-param-without-method", {"shrink.rank": 4, "shrink.param": 0.9}, 422, "shrink.param", "only used with"),
    ("shrink-recipe-unknown-key", {"shrink.recipe": "frob=1,thr=-3"}, 422, "shrink.recipe", "unknown key 'frob'"),
    ("shrink-recipe-not-a-number", {"shrink.recipe": "fro_ckpt=x,thr=-3"}, 422, "shrink.recipe", "not a number"),
    ("shrink-recipe-no-threshold", {"shrink.recipe": "fro_ckpt=1"}, 422, "shrink.recipe", "thr=X"),
    # a compressed tarball is not listed at submit: the spec's own dataset rules still apply
    ("config-toml-bad-on-tarball", {"dataset.uri": f"s3://{B}/datasets/d.tar.gz",
                                    "dataset.config_toml": "[[datasets]]\nbogus = 1\n"}, 422, "dataset.config_toml",
     "unknown key 'bogus'"),
    ("config-toml-not-toml-on-tarball", {"dataset.uri": f"s3://{B}/datasets/d.tar.gz",
                                         "dataset.config_toml": "[[datasets]\n"}, 422, "dataset.config_toml",
     "not valid TOML"),
    ("subset-dir-climbs-out-on-tarball", {"dataset.uri": f"s3://{B}/datasets/d.tar.gz",
                                          "dataset.subsets": [{"image_dir": "../../state"}]}, 422,
     "dataset.subsets[0].image_dir", "must be a folder inside the dataset"),
    # unsupported architectures and modules
    ("arch-sd3", {"model.arch": "sd3"}, 422, "model.arch", "allowed values: 'sd1', 'sd2', 'sdxl'"),
    ("arch-flux", {"model.arch": "flux"}, 422, "model.arch", "allowed values"),
    ("algo-unknown", {"network.algo": "qlora"}, 422, "network.algo", "allowed values"),
    ("module-unknown", {"network.module": "my.module"}, 422, "network.module", "allowed values"),
    ("optimizer-by-class-path", {"optimizer.type": "torch.optim.SGD"}, 422, "optimizer.type", "allowed values"),
    # URIs outside the tenant's prefixes
    ("model-other-bucket", {"model.uri": "s3://someone-else/models/x"}, 422, "model.uri", "outside the model"),
    ("dataset-dotdot", {"dataset.uri": f"s3://{B}/datasets/../state/tenants/other/x"}, 422, "dataset.uri",
     "'.' or '..' segment"),
    # percent-encoded dots and separators: S3 decodes nothing, but a proxy or client might
    ("dataset-encoded-dotdot", {"dataset.uri": f"s3://{B}/datasets/%2e%2e/state/tenants/other/x"}, 422,
     "dataset.uri", "percent-encoded '.'"),
    ("dataset-encoded-dotdot-upper", {"dataset.uri": f"s3://{B}/datasets/%2E%2E/state/tenants/other/x"}, 422,
     "dataset.uri", "percent-encoded '.'"),
    ("dataset-encoded-slash", {"dataset.uri": f"s3://{B}/datasets/..%2Fstate/tenants/other/x"}, 422,
     "dataset.uri", "percent-encoded '.'"),
    ("output-encoded-dotdot", {"save.output_uri": f"s3://{B}/results/%2e%2e/other/"}, 422, "save.output_uri",
     "percent-encoded '.'"),
    ("output-encoded-backslash", {"save.output_uri": f"s3://{B}/results/..%5cother/"}, 422, "save.output_uri",
     "percent-encoded '.'"),
    ("dataset-file-encoded-dotdot", {"dataset.uri": "file:///srv/%2e%2e/etc"}, 422, "dataset.uri",
     "'.' or '..' segment"),
    ("dataset-file-encoded-slash", {"dataset.uri": "file:///srv/..%2fetc"}, 422, "dataset.uri",
     "percent-encoded separator"),
    ("dataset-prefix-lookalike", {"dataset.uri": f"s3://{B}/datasets-evil/x"}, 422, "dataset.uri", "outside"),
    ("dataset-local-path", {"dataset.uri": "/etc"}, 422, "dataset.uri", "outside"),
    ("dataset-file-uri", {"dataset.uri": "file:///etc/passwd"}, 422, "dataset.uri", "outside"),
    ("dataset-http-uri", {"dataset.uri": "http://169.254.169.254/latest/meta-data/"}, 422, "dataset.uri", "outside"),
    ("vae-outside", {"model.vae": f"s3://{B}/private/vae.safetensors"}, 422, "model.vae", "outside"),
    ("weights-outside", {"network.weights": f"s3://{B}/results/other/lora.safetensors"}, 422, "network.weights",
     "outside"),
    ("output-other-tenant", {"save.output_uri": f"s3://{B}/results/other/"}, 422, "save.output_uri", "outside"),
    ("output-into-state-root", {"save.output_uri": f"s3://{B}/state/tenants/other/jobs/"}, 422, "save.output_uri",
     "outside"),
    ("reg-uri-empty-segment", {"dataset.reg_uri": f"s3://{B}/datasets//x"}, 422, "dataset.reg_uri",
     "empty segment"),
    # tenant limits
    ("gpus-over-tenant-limit", {"resources.gpus": 2, "resources.nodes": 2}, 429, "max_gpus_per_job", "GPUs"),
    ("runtime-over-tenant-limit", {"resources.max_runtime_s": 10**6}, 429, "max_runtime_s", "max_runtime_s"),
]


def _expand(value: Any, bucket: str) -> Any:
    if isinstance(value, str):
        return value.replace(B, bucket)
    if isinstance(value, list):
        return [_expand(v, bucket) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, bucket) for k, v in value.items()}
    return value


def _names(paths: set[str], field: str) -> bool:
    """`field` itself or an element/member below it (msgspec reports dict entries as "[...]")."""
    return any(p == field or p.startswith((field + "[", field + ".")) for p in paths)


@pytest.mark.parametrize("case, changes, status, field, words", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec(bi_api, bi_bucket, bi_unchanged, case, changes, status, field, words):
    body = {"spec": spec(bi_bucket, **_expand(changes, bi_bucket))}
    for endpoint in ("/v1/jobs", "/v1/jobs:validate"):
        # Submits carry an Idempotency-Key: a rejected one must not be recorded (bi_unchanged checks).
        headers = {**auth(), "Idempotency-Key": f"bad-{case}"} if endpoint == "/v1/jobs" else auth()
        problem = check_problem(bi_api.post(endpoint, json=body, headers=headers), status, [words])
        if status == 422:
            assert _names(problem_paths(problem), field), (field, problem)
        else:
            assert problem["limit"] == field, problem


# (id, changes, every field path the one answer must name)
SEVERAL_PROBLEMS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("dim-and-learning-rate", {"network.dim": 0, "optimizer.learning_rate": -1},
     ["network.dim", "optimizer.learning_rate"]),
    ("two-in-one-section", {"network.dim": 0, "network.alpha": 0}, ["network.dim", "network.alpha"]),
    ("two-unknown-fields", {"epochs": 3, "network.rank": 8}, ["epochs", "network.rank"]),
    ("two-subsets", {"dataset.subsets": [{"image_dir": "a", "num_repeats": 0}, {"image_dir": "b", "repeats": 2}]},
     ["dataset.subsets[0].num_repeats", "dataset.subsets[1].repeats"]),
    ("two-list-items", {"network.module": "networks.lora", "network.block_dims": [0] + [4] * 23 + [-1]},
     ["network.block_dims[0]", "network.block_dims[24]"]),
    ("two-optimizer-args", {"optimizer.args": {"decouple": True, "d_coef": 2}},
     ["optimizer.args.decouple", "optimizer.args.d_coef"]),
    ("over-64-bits-and-out-of-range", {"training.seed": 2**64, "training.batch_size": 0},
     ["training.seed", "training.batch_size"]),
    ("missing-and-wrong-type", {"model.uri": None, "training.max_train_steps": "3"},
     ["model.uri", "training.max_train_steps"]),
]


@pytest.mark.parametrize("case, changes, paths", SEVERAL_PROBLEMS, ids=[c[0] for c in SEVERAL_PROBLEMS])
def test_every_problem_is_reported_in_one_answer(bi_api, bi_bucket, bi_unchanged, case, changes, paths):
    body = {"spec": spec(bi_bucket, **changes)}
    for endpoint in ("/v1/jobs", "/v1/jobs:validate"):
        problem = check_problem(bi_api.post(endpoint, json=body, headers=auth()), 422, paths)
        got = [p["path"] for p in problem["problems"]]
        assert sorted(set(got)) == sorted(paths) == sorted(got), (case, got)
        assert problem["detail"].startswith(f"{len(paths)} problem(s) in the spec"), problem["detail"]


def test_a_rejected_submit_leaves_its_idempotency_key_free(bi_api, bi_bucket):
    headers = {**auth(), "Idempotency-Key": "retry-after-fix"}
    check_problem(bi_api.post("/v1/jobs", json={"spec": spec(bi_bucket, **{"network.dim": 0})}, headers=headers),
                  422, ["network.dim"])
    fixed = bi_api.post("/v1/jobs", json={"spec": spec(bi_bucket, name="fixed")}, headers=headers)
    assert fixed.status_code == 201, fixed.text  # not 409: the bad body never claimed the key
    again = bi_api.post("/v1/jobs", json={"spec": spec(bi_bucket, name="fixed")}, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == fixed.json()["id"]
