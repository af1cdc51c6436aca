"""Datasets as listings: discovery (folders, sd-scripts TOML), buckets, captions, the epoch plan, the report, tag operations and new versions; no pixels decoded beyond headers and hashes."""
