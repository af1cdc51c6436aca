"""Lathe trainer: trains LoRA / LyCORIS adapters for Stable Diffusion from a JobSpec.

Importing this package must stay cheap and torch-free: the service imports `trainer.spec`,
`trainer.failures` and `trainer.storage` and its image has no torch.
"""

__version__ = "0.1.0"
