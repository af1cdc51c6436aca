"""Lathe service: the stateless job API. Torch-free: imports only trainer.core.spec/failures/storage."""
