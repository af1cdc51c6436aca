"""`shrink.method` takes the `_legacy` names (sd-scripts' rank rules before its PR #2194), ranges alike."""

from __future__ import annotations

import json

import pytest

from trainer.core.shrink_choice import SHRINK_METHODS
from trainer.core.spec import SpecError, decode_spec


def spec_with(shrink: dict) -> str:
    return json.dumps({"version": 1, "model": {"uri": "s3://models/sd15"}, "dataset": {"uri": "s3://data/x"},
                       "shrink": shrink})


@pytest.mark.parametrize("method", [m for m in SHRINK_METHODS if m.endswith("_legacy")])
def test_legacy_methods_decode(method):
    param = 4.0 if method.startswith("sv_ratio") else 0.9
    assert decode_spec(spec_with({"method": method, "param": param})).shrink.method == method


@pytest.mark.parametrize("shrink,message", [
    ({"method": "sv_ratio_legacy", "param": 0.5}, "ratio ≥ 1"),
    ({"method": "sv_fro_legacy", "param": 2.0}, "(0, 1]"),
    ({"method": "sv_cumulative_legacy"}, "needs shrink.param"),
])
def test_legacy_methods_keep_the_ranges(shrink, message):
    with pytest.raises(SpecError) as info:
        decode_spec(spec_with(shrink))
    assert [p.path for p in info.value.problems] == ["shrink.param"]
    assert message in info.value.problems[0].message


def test_unknown_method_lists_the_legacy_names():
    with pytest.raises(SpecError) as info:
        decode_spec(spec_with({"method": "sv_fro_old", "param": 0.9}))
    assert info.value.problems[0].path == "shrink.method"
    assert "sv_fro_legacy" in info.value.problems[0].message
