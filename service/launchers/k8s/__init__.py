"""Kubernetes launcher: trainer attempts as batch/v1 Jobs (Indexed + headless Service for multi-node).

`settings` (KubernetesSettings), `manifests` (pure spec+settings → V1Job / V1Service), `states`
(Job/Pod conditions → AttemptState), `launcher` (KubernetesLauncher on the official client).
"""
