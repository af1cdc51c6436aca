"""Base models: tiny random pipelines for tests and benchmarks (`tiny`), loading (`load`).

Submodules import torch and diffusers; import them explicitly (`from trainer.models.load import ...`).
"""
