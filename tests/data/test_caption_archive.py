"""A `kind = "caption"` job on a .zip dataset: the archive is extracted by the training fetch and the
tag operations write a folder version of its members under the job's output."""

from __future__ import annotations

import json
import zipfile

from PIL import Image

from trainer.core.spec import spec_from_obj
from trainer.job.run import run_job


def test_caption_job_on_a_zip_writes_a_folder_version(tmp_path):
    archive = tmp_path / "bare.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            png = tmp_path / f"{i}.png"
            Image.new("RGB", (32, 24), (40 * i, 90, 160)).save(png)
            z.write(png, f"4_hero/{i}.png")
            z.writestr(f"4_hero/{i}.txt", "bad, smile, smile")
        z.writestr("4_hero/gone.txt", "orphan")
    spec = {"version": 1, "kind": "caption", "dataset": {"uri": str(archive)},
            "caption": {"remove": ["bad"], "dedupe": True, "trigger_word": "hrx", "remove_orphans": True},
            "resources": {"gpus": 0, "max_attempts": 1}}
    spec_from_obj(spec)  # an archive passes the spec check
    job = tmp_path / "job"
    job.mkdir()
    (job / "spec.json").write_text(json.dumps(spec))
    assert run_job(str(job / "spec.json"), work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache")) == 0
    version = job / "output" / "dataset" / "4_hero"
    assert sorted(p.name for p in version.iterdir()) == ["0.png", "0.txt", "1.png", "1.txt", "2.png", "2.txt"]
    assert all((version / f"{i}.txt").read_text() == "hrx, smile" for i in range(3))
    report = json.loads((job / "output" / "caption-report.json").read_text())
    assert report["source_uri"] == str(archive) and report["orphan_captions_removed"] == ["4_hero/gone.txt"]
    assert zipfile.ZipFile(archive).read("4_hero/0.txt") == b"bad, smile, smile"  # the source is unchanged
