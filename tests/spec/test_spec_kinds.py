"""Job kinds: the sections each kind needs or refuses, and docs/spec.md describing the optional sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.core.spec import CaptionSpec, DatasetSpec, MergeAdapterSpec, MergeSpec, ModelSpec, SpecError, spec_from_obj

DOCS = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
MODEL = {"uri": "s3://m/sd15.safetensors"}
MERGE = {"adapters": [{"uri": "s3://o/a.safetensors", "ratio": -1.5}]}


def _problems(obj: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        spec_from_obj(obj)
    return {p.path: p.message for p in exc.value.problems}


def test_each_kind_takes_its_own_sections():
    assert spec_from_obj({"version": 1, "model": MODEL, "dataset": {"uri": "s3://d/x"}}).kind == "train"
    merge = spec_from_obj({"version": 1, "kind": "merge", "model": MODEL, "merge": MERGE})
    assert merge.dataset is None and merge.merge.adapters[0].ratio == -1.5
    shrink = spec_from_obj({"version": 1, "kind": "shrink", "model": MODEL, "shrink": {"adapter": "s3://o/a.safetensors"}})
    assert shrink.shrink.adapter == "s3://o/a.safetensors"
    assert "merge" in _problems({"version": 1, "kind": "merge", "model": MODEL})
    assert "dataset" in _problems({"version": 1, "kind": "merge", "model": MODEL, "merge": MERGE, "dataset": {"uri": "s3://d"}})
    assert "dataset" in _problems({"version": 1, "model": MODEL})
    assert "shrink.adapter" in _problems({"version": 1, "kind": "shrink", "model": MODEL})
    assert "shrink.adapter" in _problems({"version": 1, "model": MODEL, "dataset": {"uri": "s3://d"},
                                          "shrink": {"adapter": "s3://o/a.safetensors"}})
    too_far = {"adapters": [{"uri": "s3://o/a.safetensors", "ratio": 10.5}]}
    assert any(p.startswith("merge.adapters") for p in _problems({"version": 1, "kind": "merge", "model": MODEL,
                                                                  "merge": too_far}))


def test_caption_kind_takes_a_dataset_a_caption_section_and_an_optional_tagger():
    data = {"uri": "s3://d/bare"}
    tagged = spec_from_obj({"version": 1, "kind": "caption", "model": {"uri": "s3://m/tagger"}, "dataset": data,
                            "caption": {"thresh": 0.5, "trigger_word": "sks"}})
    assert tagged.caption.thresh == 0.5 and tagged.model.uri == "s3://m/tagger"
    ops = spec_from_obj({"version": 1, "kind": "caption", "dataset": data, "caption": {"remove": ["bad"]}})
    assert ops.model is None and ops.caption.remove == ["bad"]
    assert "caption" in _problems({"version": 1, "kind": "caption", "dataset": data, "caption": {}})  # does nothing
    assert "caption" in _problems({"version": 1, "kind": "caption", "model": MODEL, "dataset": data})
    assert "dataset" in _problems({"version": 1, "kind": "caption", "model": MODEL, "caption": {}})
    assert "caption.thresh" in _problems({"version": 1, "kind": "caption", "model": MODEL, "dataset": data,
                                          "caption": {"thresh": 1.5}})
    assert "caption.general_threshold" in _problems({"version": 1, "kind": "caption", "model": MODEL,
                                                     "dataset": data, "caption": {"general_threshold": -0.1}})
    assert "caption.replace" in _problems({"version": 1, "kind": "caption", "dataset": data,
                                           "caption": {"replace": {"a": " "}}})
    archive = spec_from_obj({"version": 1, "kind": "caption", "model": MODEL, "dataset": {"uri": "s3://d/x.zip"},
                             "caption": {}})  # the trainer extracts it as for training
    assert archive.dataset.uri == "s3://d/x.zip"
    assert "caption" in _problems({"version": 1, "model": MODEL, "dataset": data, "caption": {}})  # train kind
    assert "model" in _problems({"version": 1, "dataset": data})  # only a caption job goes without a model


def test_docs_describe_the_optional_sections_fields():
    text = DOCS.read_text(encoding="utf-8")
    missing = [f"dataset.{f}" for f in DatasetSpec.__struct_fields__ if f"`dataset.{f}`" not in text]
    missing += [f"merge.{f}" for f in MergeSpec.__struct_fields__ if f"`merge.{f}`" not in text]
    missing += [f for f in MergeAdapterSpec.__struct_fields__ if f"`{f}`" not in text]
    missing += [f"caption.{f}" for f in CaptionSpec.__struct_fields__ if f"`caption.{f}`" not in text]
    missing += [f"model.{f}" for f in ModelSpec.__struct_fields__ if f"`model.{f}`" not in text]
    assert not missing, f"docs/spec.md does not describe: {missing}"
