"""TrainerSettings: the trainer's LATHE_* variables, typed, read through the loader the service uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.core.envsettings import SettingsError
from trainer.core.settings import TrainerSettings, trainer_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_apply_to_unset_and_empty_variables() -> None:
    s = TrainerSettings.from_env({"PATH": "/bin", "LATHE_CACHE_DIR": " ", "LATHE_SHRINK_WORKERS": ""})
    assert s == TrainerSettings()
    assert s.job_attempt == 1 and s.max_dataset_files == 200_000 and s.max_image_pixels == 8192 * 8192
    assert s.model_cache() == Path.home() / ".cache" / "lathe"


def test_variables_are_typed() -> None:
    s = TrainerSettings.from_env({"LATHE_CACHE_DIR": "/cache/models", "LATHE_JOB_ATTEMPT": "3",
                                  "LATHE_MAX_DATASET_BYTES": "1000", "LATHE_SHRINK_WORKERS": "2",
                                  "LATHE_TOKENIZERS_DIR": "/tok", "LATHE_GIT_COMMIT": "0123abc"})
    assert (s.job_attempt, s.max_dataset_bytes, s.shrink_workers) == (3, 1000, 2)
    assert s.model_cache() == Path("/cache/models") and s.tokenizers_dir == "/tok" and s.git_commit == "0123abc"


@pytest.mark.parametrize(("env", "variable"), [
    ({"LATHE_JOB_ATTEMPT": "0"}, "LATHE_JOB_ATTEMPT"),
    ({"LATHE_MAX_DATASET_FILES": "many"}, "LATHE_MAX_DATASET_FILES"),
    ({"LATHE_SHRINK_WORKERS": "-1"}, "LATHE_SHRINK_WORKERS"),
])
def test_a_bad_value_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable}: "):
        TrainerSettings.from_env(env)


def test_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATHE_JOB_ATTEMPT", "4")
    assert trainer_settings().job_attempt == 4
    monkeypatch.setenv("LATHE_JOB_ATTEMPT", "5")
    assert trainer_settings().job_attempt == 4
    trainer_settings.cache_clear()
    assert trainer_settings().job_attempt == 5


def test_no_trainer_module_reads_settings_at_import() -> None:
    """A bad variable fails where a value is used, not at import (the CLI imports these to print usage)."""
    code = "import trainer.job.fetch, trainer.job.launch"
    env = {"PATH": "/usr/bin:/bin", "LATHE_MAX_DATASET_BYTES": "lots", "LATHE_SHRINK_WORKERS": "x"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
