"""Lathe service: the stateless job API. Torch-free: imports only trainer.spec/failures/storage."""
