"""Models and adapters: base pipelines (loading, tiny random ones), the adapter network built from the
spec, sd-scripts key names, adapter files with their metadata, and merges into a checkpoint.

Submodules import torch and diffusers; import them explicitly (`from trainer.models.load import ...`).
"""
