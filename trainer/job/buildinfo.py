"""What metadata.json says about the code that ran: the git commit and the library versions."""

from __future__ import annotations

from pathlib import Path

from trainer.core.settings import trainer_settings


def git_commit() -> str | None:
    """LATHE_GIT_COMMIT where set (a copy of the code without .git), else the checkout's HEAD."""
    if trainer_settings().git_commit:
        return trainer_settings().git_commit
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "lycoris-lora", "safetensors", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
