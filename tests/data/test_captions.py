"""Caption processing: sd-scripts' shuffle / keep_tokens / dropout rules, reproducible with a seeded RNG."""

from __future__ import annotations

import random

from trainer.core.dataset.captions import CaptionOptions, process_caption, tag_frequency

CAPTION = "mychar, red hair, smile, outdoors, looking at viewer"


def run(opts: CaptionOptions, caption: str = CAPTION, *, epoch: int = 1, seed: int = 0) -> str:
    return process_caption(caption, opts, epoch=epoch, rng=random.Random(seed))


def test_plain_caption_is_untouched_and_first_line_only():
    assert run(CaptionOptions()) == CAPTION
    assert run(CaptionOptions(), "line one\nline two") == "line one"


def test_shuffle_keeps_leading_tokens_and_rejoins_with_comma_space():
    opts = CaptionOptions(shuffle=True, keep_tokens=1)
    outs = {run(opts, seed=s) for s in range(20)}
    assert len(outs) > 5
    for out in outs:
        parts = out.split(", ")
        assert parts[0] == "mychar" and sorted(parts) == sorted(t.strip() for t in CAPTION.split(","))
    assert run(opts, seed=3) == run(opts, seed=3)


def test_shuffle_matches_random_shuffle_of_the_flexible_part():
    rng = random.Random(7)
    flex = ["red hair", "smile", "outdoors", "looking at viewer"]
    rng.shuffle(flex)
    assert run(CaptionOptions(shuffle=True, keep_tokens=1), seed=7) == ", ".join(["mychar", *flex])


def test_custom_separator_and_secondary_separator():
    out = run(CaptionOptions(shuffle=True, separator=";", keep_tokens=1), "a; b; c; d", seed=1)
    assert out.startswith("a, ") and sorted(out.split(", ")) == ["a", "b", "c", "d"]
    opts = CaptionOptions(shuffle=True, keep_tokens=1, secondary_separator=";;;")
    for s in range(5):
        out = run(opts, "a, b;;;c, d", seed=s)
        assert out.startswith("a, ") and "b,c" in out  # "b;;;c" moved as one part, then became "b,c"


def test_keep_tokens_separator_fixes_prefix_and_suffix():
    opts = CaptionOptions(shuffle=True, keep_tokens_separator="|||")
    for s in range(10):
        out = run(opts, "mychar, 1girl ||| smile, hat, red ||| masterpiece", seed=s)
        assert out.startswith("mychar, 1girl, ") and out.endswith(", masterpiece")


def test_caption_dropout_rate_and_every_n_epochs():
    assert run(CaptionOptions(dropout_rate=1.0)) == ""
    every2 = CaptionOptions(dropout_every_n_epochs=2)
    assert run(every2, epoch=1) == CAPTION and run(every2, epoch=2) == "" and run(every2, epoch=4) == ""
    drops = sum(run(CaptionOptions(dropout_rate=0.3), seed=s) == "" for s in range(1000))
    assert 240 < drops < 360


def test_tag_dropout_drops_only_flexible_tags():
    opts = CaptionOptions(keep_tokens=1, tag_dropout_rate=0.5)
    lengths = set()
    for s in range(50):
        parts = run(opts, seed=s).split(", ")
        assert parts[0] == "mychar"
        lengths.add(len(parts))
    assert min(lengths) < 5 and max(lengths) <= 5
    assert run(CaptionOptions(keep_tokens=1, tag_dropout_rate=1.0)) == "mychar"


def test_prefix_suffix_and_wildcards():
    assert run(CaptionOptions(prefix="pre", suffix="post"), "a, b") == "pre a, b post"
    outs = {run(CaptionOptions(enable_wildcard=True), "a {red|blue} {{x}}", seed=s) for s in range(20)}
    assert outs == {"a red {x}", "a blue {x}"}
    lines = {run(CaptionOptions(enable_wildcard=True), "one\ntwo", seed=s) for s in range(20)}
    assert lines == {"one", "two"}


def test_static_flag_and_tag_frequency():
    assert CaptionOptions().is_static and not CaptionOptions(shuffle=True).is_static
    assert tag_frequency(["A, b", "a, c,"]) == {"a": 2, "b": 1, "c": 1}
