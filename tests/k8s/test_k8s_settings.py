"""KubernetesSettings.from_env: every kind of field, and errors that name the variable."""

from __future__ import annotations

import msgspec
import pytest

from service.launchers.k8s.settings import KubernetesSettings, SettingsError, Toleration


def test_defaults_without_variables() -> None:
    assert KubernetesSettings.from_env({"PATH": "/bin", "LATHE_STATE_ROOT": "s3://x"}) == KubernetesSettings()


def test_every_kind_of_value() -> None:
    settings = KubernetesSettings.from_env({
        "LATHE_K8S_NAMESPACE": "training",
        "LATHE_K8S_TRAINER_IMAGE": "registry.example.com/lathe/trainer@sha256:" + "a" * 64,
        "LATHE_K8S_IMAGE_PULL_SECRETS": "regcred, mirror",
        "LATHE_K8S_NODE_SELECTOR": '{"lathe.dev/pool": "gpu"}',
        "LATHE_K8S_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
        "LATHE_K8S_MODEL_CACHE": "lathe-models",
        "LATHE_K8S_TERMINATION_GRACE_S": "900",
        "LATHE_K8S_DEFAULT_MAX_RUNTIME_S": "",  # empty ⇒ default (None)
        "LATHE_K8S_EXTRA_ENV": '{"NCCL_DEBUG": "INFO"}',
        "LATHE_K8S_IMAGE_PULL_POLICY": "Always",
    })
    assert settings.namespace == "training"
    assert settings.image_pull_secrets == ("regcred", "mirror")
    assert KubernetesSettings.from_env({"LATHE_K8S_IMAGE_PULL_SECRETS": '["a"]'}).image_pull_secrets == ("a",)
    assert settings.node_selector == {"lathe.dev/pool": "gpu"}
    assert settings.tolerations == (Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),)
    assert settings.model_cache == "lathe-models" and not settings.model_cache_is_host_path
    assert settings.termination_grace_s == 900
    assert settings.default_max_runtime_s is None
    assert settings.extra_env == {"NCCL_DEBUG": "INFO"}
    assert settings.image_pull_policy == "Always"


@pytest.mark.parametrize(("env", "message"), [
    ({"LATHE_K8S_NAMESPCE": "x"}, "LATHE_K8S_NAMESPCE: unknown setting; known variables: LATHE_K8S_NAMESPACE"),
    ({"LATHE_K8S_NAMESPACE": "Not_DNS"}, "LATHE_K8S_NAMESPACE: Expected `str` matching regex"),
    ({"LATHE_K8S_TERMINATION_GRACE_S": "five"}, "LATHE_K8S_TERMINATION_GRACE_S: not valid JSON"),
    ({"LATHE_K8S_TERMINATION_GRACE_S": "5"}, "LATHE_K8S_TERMINATION_GRACE_S: Expected `int` >= 30"),
    ({"LATHE_K8S_NODE_SELECTOR": "pool=gpu"}, 'LATHE_K8S_NODE_SELECTOR: not valid JSON (Expecting value); expected e.g. {"key": "value"}'),
    ({"LATHE_K8S_TOLERATIONS": '[{"operator": "Maybe"}]'}, "LATHE_K8S_TOLERATIONS: Invalid enum value 'Maybe'"),
    ({"LATHE_K8S_MODEL_CACHE": "Models_PVC"}, "LATHE_K8S_MODEL_CACHE: model_cache: 'Models_PVC' is neither"),
    ({"LATHE_K8S_RUN_AS_USER": "0"}, "LATHE_K8S_RUN_AS_USER: Expected `int` >= 1"),
    ({"LATHE_K8S_SCRATCH_SIZE": "lots"}, "LATHE_K8S_SCRATCH_SIZE: Expected `str` matching regex"),
    ({"LATHE_K8S_EXTRA_ENV": '{"1BAD": "x"}'}, "LATHE_K8S_EXTRA_ENV"),
])
def test_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        KubernetesSettings.from_env(env)
    assert str(info.value).startswith(message) or message in str(info.value)


def test_settings_embed_in_a_larger_msgspec_struct() -> None:
    # The service's main Settings embeds KubernetesSettings; decoding validates the same rules.
    class Settings(msgspec.Struct):
        kubernetes: KubernetesSettings = msgspec.field(default_factory=KubernetesSettings)

    decoded = msgspec.convert({"kubernetes": {"namespace": "gpu-jobs", "kueue_queue": "q"}}, Settings)
    assert decoded.kubernetes.namespace == "gpu-jobs" and decoded.kubernetes.kueue_queue == "q"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.kubernetes\.namespace"):
        msgspec.convert({"kubernetes": {"namespace": "Bad Name"}}, Settings)
