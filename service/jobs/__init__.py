"""What a request does, free of HTTP: submit, validate, preflight, read, list, cancel, delete, diffs, adapter headers, artifacts, spec conversion."""
