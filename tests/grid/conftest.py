"""The API-level grid test runs on the service tests' stack: the real app with a LocalLauncher on the
local S3 server (tests/conftest.py), its tenants and bucket (tests/service/conftest.py)."""

from tests.service.conftest import (  # noqa: F401 (fixtures)
    bucket,
    client_factory,
    local_launcher_env,
    s3,
    settings_factory,
    tokens_file,
)
