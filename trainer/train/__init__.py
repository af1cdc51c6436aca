"""The training loop on accelerate: the recipe's phases, the step, noise and losses, optimizers, schedulers, latent caches, saving, training state and sd-scripts metadata."""
