"""The WD14-format tagger on a tiny ONNX graph with the real signature (NHWC BGR float input, one
sigmoid score per row of selected_tags.csv), built with onnx's helper API: the selected tags are
checked against the model's own scores; folders that are not taggers fail naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.tagger_helpers import ROWS, build_tagger
from trainer.core.failures import JobFailure
from trainer.caption.tagger import Tag, Tagger, TaggerOptions, _shown, preprocess, select_tags


def images(n: int = 20) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray((rng.random((24 + i, 40, 3)) * rng.random(3) * 255).astype(np.uint8)) for i in range(n)]


def test_thresholds_against_the_models_own_scores(tmp_path):
    options = TaggerOptions(general_threshold=0.5, character_threshold=0.3, batch_size=6, trigger_word="hrx")
    tagger = Tagger.load(build_tagger(tmp_path / "tagger"), options)
    pics = images()
    scores = tagger.scores(pics)
    assert scores.shape == (20, len(ROWS))
    captions = dict(tagger.tag_images(((f"{i}.png", im) for i, im in enumerate(pics)), options))
    assert len(captions) == 20
    cut = 0
    for i in range(20):
        tags = captions[f"{i}.png"].split(", ")
        assert tags[0] == "hrx"
        want_char = [n.replace("_", " ") for (n, c), p in zip(ROWS, scores[i]) if c == "4" and p >= 0.3]
        want_gen = [(n.replace("_", " ") if len(n) > 3 else n) for (n, c), p in zip(ROWS, scores[i])
                    if c == "0" and p >= 0.5]
        assert tags[1:] == want_char + want_gen  # character tags first, CSV order, no rating
        cut += sum(1 for (_, c), p in zip(ROWS, scores[i]) if c == "0" and 0 < p < 0.5)
    assert cut > 0  # some general tags really fell below the threshold
    assert any("red hair" in c or "long hair" in c or "blue sky" in c for c in captions.values())
    # batching does not change the scores
    assert np.allclose(tagger.scores(pics[:3]), scores[:3], atol=1e-5)


def test_options_rating_undesired_underscore_and_expand():
    def table(opts):
        return [Tag(name=_shown(n, c, opts), raw=n, category=c) for n, c in ROWS]

    probs = np.full(len(ROWS), 0.9, np.float32)
    probs[:4] = [0.1, 0.7, 0.15, 0.05]
    opts = TaggerOptions(use_rating_tags=True, undesired_tags=("sword", "blue sky"), character_tag_expand=True,
                         always_first_tags=("smile",))
    out = select_tags(probs, table(opts), opts)
    assert out[:2] == ["smile", "sensitive"]  # always-first, then the argmax rating
    assert "hero, series" in out and "villain, other series" in out
    assert "sword" not in out and "blue sky" not in out and "^_^" in out  # 3-character tags keep "_"
    raw = TaggerOptions(remove_underscore=False, character_tags_first=False, use_rating_tags_as_last_tag=True)
    out = select_tags(probs, table(raw), raw)
    assert out[0] == "1girl" and out[-1] == "sensitive" and "red_hair" in out
    assert "general" not in select_tags(probs, table(TaggerOptions()), TaggerOptions())  # ratings off by default


def test_preprocess_pads_white_and_flips_to_bgr():
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    arr = preprocess(im, 20)
    assert arr.shape == (20, 20, 3) and arr.dtype == np.float32
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[10, 10]) == (0, 0, 255)


@pytest.mark.parametrize("break_it, words", [
    (lambda d: (d / "selected_tags.csv").unlink(), "selected_tags.csv not found"),
    (lambda d: (d / "model.onnx").unlink(), "expected one .onnx model"),
    (lambda d: (d / "model.onnx").write_bytes(b"not onnx"), "not a loadable ONNX model"),
    (lambda d: (d / "selected_tags.csv").write_text("id,tag\n1,x\n"), "tag_id,name,category"),
    (lambda d: build_tagger(d, channels=1), "(batch, S, S, 3)"),
    (lambda d: build_tagger(d, rows=ROWS[:5]) and None, None),
])
def test_folders_that_are_not_taggers_fail_naming_the_file(tmp_path, break_it, words):
    folder = build_tagger(tmp_path / "t")
    break_it(folder)
    if words is None:  # a CSV that does not match the model's output width
        (folder / "selected_tags.csv").write_text("tag_id,name,category\n" + "".join(f"{i},t{i},0\n" for i in range(3)))
        words = "one column per row of selected_tags.csv"
    with pytest.raises(JobFailure) as info:
        Tagger.load(folder)
    assert info.value.reason.value == "model_invalid" and words in info.value.message, info.value.message


def test_threshold_out_of_range_is_named():
    assert TaggerOptions(general_threshold=1.5).problems() == [
        ("general_threshold", "must be a probability between 0 and 1, got 1.5")]


def test_tag_a_bare_dataset_on_s3_into_a_new_version(tmp_path, s3_server, s3_bucket):
    """20 generated images without captions → 20 caption files (trigger first, thresholds respected,
    '_' replaced), written under another prefix; the source keeps no caption file."""
    import io

    import boto3

    from trainer.caption.captioning import main as tag_main

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    model = build_tagger(tmp_path / "tagger")
    for f in model.iterdir():
        s3.put_object(Bucket=s3_bucket, Key=f"models/wd14/{f.name}", Body=f.read_bytes())
    pics = images()
    for i, im in enumerate(pics):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        s3.put_object(Bucket=s3_bucket, Key=f"data/bare/5_hero/{i:02d}.png", Body=buf.getvalue())
    src, dest = f"s3://{s3_bucket}/data/bare", f"s3://{s3_bucket}/data/tagged"
    rc = tag_main([f"s3://{s3_bucket}/models/wd14", src, dest, "--general-threshold", "0.5",
                   "--character-threshold", "0.3", "--trigger", "hrx", "--batch-size", "6"])
    assert rc == 0
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="data/")["Contents"]}
    assert not any(k.startswith("data/bare/") and k.endswith(".txt") for k in listed)
    scores = Tagger.load(model).scores(pics)
    for i in range(20):
        caption = s3.get_object(Bucket=s3_bucket, Key=f"data/tagged/5_hero/{i:02d}.txt")["Body"].read().decode()
        tags = caption.split(", ")
        assert tags[0] == "hrx" and not any("_" in t and len(t) > 3 for t in tags)
        chosen = {n for (n, c), p in zip(ROWS, scores[i]) if (c == "0" and p >= 0.5) or (c == "4" and p >= 0.3)}
        assert set(tags[1:]) == {(n.replace("_", " ") if len(n) > 3 else n) for n in chosen}
        assert f"data/tagged/5_hero/{i:02d}.png" in listed
    # a model folder that is not a tagger fails naming the file; an out-of-range threshold names the option
    s3.put_object(Bucket=s3_bucket, Key="models/nottagger/model.onnx", Body=b"x")
    assert tag_main([f"s3://{s3_bucket}/models/nottagger", src, dest + "2"]) == 12  # model_invalid
    assert tag_main([f"s3://{s3_bucket}/models/wd14", src, dest + "3", "--thresh", "1.5"]) == 10  # spec_invalid


def test_caption_version_runs_the_tag_operations_after_tagging(tmp_path):
    """The caption job's writer: tagging, then the operations (trigger last, so first), orphan captions
    left out, unchanged files copied; the destination must be empty and outside the source."""
    from trainer.job.caption_job import tag_ops
    from trainer.caption.captioning import caption_dataset
    from trainer.core.spec import CaptionSpec

    src = tmp_path / "src" / "3_x"
    src.mkdir(parents=True)
    for i, im in enumerate(images(3)):
        im.save(src / f"{i}.png")
    (src / "gone.txt").write_text("orphan, tag")
    (src / "about.md").write_text("kept as it is")
    options = TaggerOptions(thresh=0.0)  # every general and character tag
    tagger = Tagger.load(build_tagger(tmp_path / "tagger"), options)
    c = CaptionSpec(thresh=0.0, remove=["smile"], replace={"1girl": "1woman"}, trigger_word="sks", remove_orphans=True)
    dest = tmp_path / "v2"
    result = caption_dataset(str(tmp_path / "src"), str(dest), tagger=tagger, options=options, ops=tag_ops(c),
                             remove_orphans=True)
    assert result.removed == ["3_x/gone.txt"] and not (dest / "3_x" / "gone.txt").exists()
    assert (dest / "3_x" / "about.md").read_text() == "kept as it is"
    for i in range(3):
        tags = (dest / "3_x" / f"{i}.txt").read_text().split(", ")
        assert tags[0] == "sks" and "smile" not in tags and "1woman" in tags and "1girl" not in tags
    with pytest.raises(JobFailure) as exc:
        caption_dataset(str(tmp_path / "src"), str(dest), tagger=tagger, options=options)
    assert "not empty" in exc.value.message
    with pytest.raises(JobFailure) as exc:
        caption_dataset(str(tmp_path / "src"), str(tmp_path / "src" / "v3"), tagger=tagger, options=options)
    assert "overlaps" in exc.value.message
