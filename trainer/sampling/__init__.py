"""Rendering: sample images during training and comparison grids over saves, weights and seeds."""
