"""2 nodes × 2 GPUs: each pod's effective `accelerate launch` command, as the kubelet would run it.

The Job goes through the real client to the stand-in API server, whose Job controller creates the
Indexed pods (completion-index annotation, hostname `<job>-<index>`); `kubelet.command_line` resolves
the downward-API env and expands `$(VAR)` as the kubelet does; accelerate's own parser and launcher
logic then turn each command into the torchrun settings a node would start with.
"""

from __future__ import annotations

import os

from k8s_helpers import SPEC_URI, make_request
from fake_apiserver import FakeApiServer, parse_selector
from kubelet import command_line

from service.launchers.k8s.launcher import KubernetesLauncher


def _torchrun_settings(argv: list[str]) -> dict[str, object]:
    """What `accelerate launch <argv>` hands to torch.distributed.run (node rank, rendezvous, counts)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    assert argv[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(argv[2:])
    args = _validate_launch_command(args)[0]
    saved = dict(os.environ)
    try:
        env = prepare_multi_gpu_env(args)  # rewrites args into torchrun's (nnodes, node_rank, rdzv_endpoint…)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {
        "nnodes": args.nnodes, "nproc_per_node": args.nproc_per_node, "node_rank": args.node_rank,
        "rdzv_endpoint": args.rdzv_endpoint, "module": args.module,
        "script": args.training_script, "script_args": args.training_script_args,
        "mixed_precision": env["ACCELERATE_MIXED_PRECISION"],
    }


def test_two_nodes_two_gpus_give_each_index_its_rank(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    request = make_request({"gpus": 2, "nodes": 2}, precision={"mixed_precision": "bf16"})
    launcher.submit(request)
    api.sync_jobs()  # the Job controller creates one pod per completion index

    name = "j-20261123t101500-ab12cd34-a1"
    pods = sorted(api.pods_of("lathe", name), key=lambda p: p["metadata"]["annotations"][
        "batch.kubernetes.io/job-completion-index"])
    assert len(pods) == 2
    service = api.get("services", "lathe", name)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    selects = parse_selector(",".join(f"{k}={v}" for k, v in service["spec"]["selector"].items()))
    assert all(selects(p["metadata"]["labels"]) for p in pods)  # both ranks get DNS records

    # Rank 0's address as the pods see it: <hostname>.<subdomain>.<namespace>.svc
    pod0 = pods[0]["spec"]
    rank0_dns = f"{pod0['hostname']}.{pod0['subdomain']}.lathe.svc"
    assert pod0["subdomain"] == service["metadata"]["name"]

    for index, pod in enumerate(pods):
        argv = command_line(pod, "trainer", secrets={"lathe-s3": {
            "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}})
        assert argv[:5] == ["python", "-m", "trainer", "launch", "--"]  # passes the trainer's exit code on
        argv = argv[5:]
        assert argv == [
            "accelerate", "launch", "--multi_gpu",
            "--num_processes", "4", "--num_machines", "2", "--machine_rank", str(index),
            "--main_process_ip", rank0_dns, "--main_process_port", "29500",
            "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "trainer", "run", SPEC_URI,
        ]
        assert _torchrun_settings(argv) == {
            "nnodes": "2", "nproc_per_node": "2", "node_rank": index,
            "rdzv_endpoint": f"{rank0_dns}:29500", "module": True,
            "script": "trainer", "script_args": ["run", SPEC_URI], "mixed_precision": "bf16",
        }
