"""Command-line tools around adapters and data: inspect an adapter file, generate a tiny dataset."""
