"""How an attempt starts and is watched: the Launcher protocol, local subprocesses and Kubernetes Jobs."""
