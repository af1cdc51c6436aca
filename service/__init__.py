"""Lathe service: the stateless job API. Torch-free: of the trainer it imports only `trainer.core`."""
