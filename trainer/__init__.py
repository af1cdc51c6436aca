"""Lathe trainer: trains LoRA / LyCORIS adapters for Stable Diffusion from a JobSpec.

Importing this package must stay cheap and torch-free: the service imports `trainer.core.spec`,
`trainer.core.failures` and `trainer.core.storage` and its image has no torch.
"""

import time

__version__ = "0.1.0"

# Wall clock when the trainer package was first imported (≈ process start for `python -m trainer`):
# metadata's `first_step_s` is measured from here, so it includes the imports.
STARTED_AT = time.time()
