"""The durable tier on a local S3 server: client choice, drain, training while draining, restore.

    python benchmarks/drain.py [--size-mib 1024] [--ranks 2] [--repeats 3]

A moto S3 server (``python -m moto.server``) runs in its own process on 127.0.0.1; every client
reaches it as it would reach AWS or MinIO (endpoint URL and credentials). moto's server is
itself slow (a single Python process), so each row is set against a plain upload or download
of the same bytes to the same server in the same run, and the ratios are what we target:

1. client: one object of ``--size-mib`` uploaded by s3fs (``put_file``, multipart) and by
   obstore (``obstore.put``, multipart, parallel parts); medians in MiB/s. memckpt drains
   through fsspec, hence s3fs.
2. drain: ``--ranks`` spawned gloo ranks, each with a ``CheckpointManager(persist_every=1,
   persist_dir=s3://...)`` holding ``--size-mib`` of state. Time from the commit to the step
   persisted (every rank's object uploaded and verified, manifest last), against every rank
   uploading the same bytes with a plain s3fs ``put_file`` at the same time (>= 0.8x target).
3. training while draining: a CPU matmul loop's step time while a drain is in flight, against
   the same loop with no drain (<= 1.05x target), and against the loop during a plain
   ``put_file`` of the same bytes (what the upload and the local server cost by themselves).
4. restore: memory wiped, ``CheckpointManager(persist_dir=...).load()`` against plain
   ``dcp.load`` through torch's ``FsspecReader`` of the same state saved by ``FsspecWriter`` to
   the same server (<= 1x target).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gloo_world import free_port, run_world

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server in its own process; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the moto S3 server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3fs_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "skip_instance_cache": True}


def make_state(size_mib: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = 8
    per = (size_mib << 20) // n // 4
    # keys name the rank: DCP saves one copy of a plain tensor that every rank holds
    return {f"r{seed}.t{i}": torch.randn(per, generator=g) for i in range(n)}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- 1. client -----------------------------------------------------------------------------------
def client_rows(a: argparse.Namespace, endpoint: str, bucket: str, work: Path) -> dict[str, Any]:
    import s3fs

    src = work / "object.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20) * a.size_mib)
    size = a.size_mib << 20
    fs = s3fs.S3FileSystem(**s3fs_options(endpoint))
    rows: dict[str, list[float]] = {"s3fs": [], "obstore": []}
    try:
        import obstore
        from obstore.store import S3Store

        store = S3Store(bucket, endpoint=endpoint, allow_http=True, region="us-east-1",
                        access_key_id="bench", secret_access_key="bench")  # fmt: skip
    except ImportError:
        store = None
    for i in range(a.repeats):
        t = time.perf_counter()
        fs.put_file(str(src), f"{bucket}/client/s3fs-{i}")
        rows["s3fs"].append(size / (time.perf_counter() - t) / 2**20)
        if store is not None:
            t = time.perf_counter()
            with open(src, "rb") as f:
                obstore.put(store, f"client/obstore-{i}", f, chunk_size=16 << 20,
                            max_concurrency=8)  # fmt: skip
            rows["obstore"].append(size / (time.perf_counter() - t) / 2**20)
    src.unlink()
    return {k: median(v) for k, v in rows.items() if v}


# -- 2-4. ranks ----------------------------------------------------------------------------------
def matmul_steps(n: int) -> list[float]:
    x = torch.randn(512, 512)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        for _ in range(4):
            x = torch.tanh(x @ x) * 0.5
        out.append(time.perf_counter() - t)
    return out


def rank_main(rank: int, world: int, a: dict[str, Any], endpoint: str, bucket: str,
              work: str) -> dict[str, Any]:  # fmt: skip
    import s3fs
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    import memckpt
    from memckpt.engine import drain

    os.environ.update(CREDENTIALS)
    opts = s3fs_options(endpoint)
    url = f"s3://{bucket}/drain"
    base = Path(work) / f"node{rank}"
    state = make_state(a["size_mib"], seed=rank)
    fs = s3fs.S3FileSystem(**opts)
    names = ("drain_s", "plain_s", "quiet_step", "draining_step", "uploading_step",
             "restore_s", "dcp_load_s")  # fmt: skip
    res: dict[str, list[float]] = {k: [] for k in names}
    step = 0
    for rep in range(a["repeats"]):
        # plain upload of the same bytes, every rank at once
        with memckpt.CheckpointManager(base, "bench", keep_last=1, node_id=f"n{rank}",
                                       replication=None) as m:  # fmt: skip
            step += 1
            m.save(step, state).wait()
            obj = next((base / "bench" / f"step-{step}").glob("rank-*.mck"))
            dist.barrier()
            t = time.perf_counter()
            upload = threading.Thread(
                target=fs.put_file, args=(str(obj), f"{bucket}/plain/{rep}/rank-{rank}.mck")
            )
            upload.start()
            res["uploading_step"].extend(matmul_steps(a["steps"]))  # the server's share
            upload.join()
            dist.barrier()
            res["plain_s"].append(time.perf_counter() - t)
        shutil.rmtree(base, ignore_errors=True)
        # the drain, and a training loop while it runs
        with memckpt.CheckpointManager(base, "bench", keep_last=1, node_id=f"n{rank}",
                                       replication=None, persist_every=1, persist_dir=url,
                                       persist_options=opts) as m:  # fmt: skip
            res["quiet_step"].extend(matmul_steps(a["steps"]))
            dist.barrier()
            step += 1
            t = time.perf_counter()
            m.save(step, state).wait()
            during = matmul_steps(a["steps"])
            drain.wait_for_drains()
            dist.barrier()
            # rank 0 uploads the manifest once every rank's object is there
            res["drain_s"].append(time.perf_counter() - t)
            res["draining_step"].extend(during)
        shutil.rmtree(base, ignore_errors=True)
        dist.barrier()
        # restore with memory wiped, against plain DCP from the same server
        t = time.perf_counter()
        with memckpt.CheckpointManager(base, "bench", node_id=f"n{rank}", replication=None,
                                       persist_dir=url, persist_options=opts) as m:  # fmt: skip
            loaded = m.load()
            res["restore_s"].append(time.perf_counter() - t)
            assert all(torch.equal(loaded[k], v) for k, v in state.items())
        shutil.rmtree(base, ignore_errors=True)
        dcp_url = f"s3://{bucket}/dcp/{rep}"
        dcp.save(state, storage_writer=FsspecWriter(dcp_url, **opts))
        target = {k: torch.empty_like(v) for k, v in state.items()}
        dist.barrier()
        t = time.perf_counter()
        dcp.load(target, storage_reader=FsspecReader(dcp_url, **opts))
        res["dcp_load_s"].append(time.perf_counter() - t)
        assert all(torch.equal(target[k], v) for k, v in state.items())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, res)
    return {"ranks": gathered}


def summarize(client: dict[str, Any], ranks: list[dict[str, list[float]]],
              a: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    total = a.ranks * (a.size_mib << 20) / 2**20
    drain = median(ranks[0]["drain_s"])
    plain = median([max(r["plain_s"][i] for r in ranks) for i in range(a.repeats)])
    quiet = median([x for r in ranks for x in r["quiet_step"]])
    busy = median([x for r in ranks for x in r["draining_step"]])
    uploading = median([x for r in ranks for x in r["uploading_step"]])
    restore = median([max(r["restore_s"][i] for r in ranks) for i in range(a.repeats)])
    dcp_load = median([max(r["dcp_load_s"][i] for r in ranks) for i in range(a.repeats)])
    return {
        "client_mib_s": client,
        "drain_mib_s": total / drain,
        "plain_upload_mib_s": total / plain,
        "drain_vs_plain": plain / drain,
        "step_s_quiet": quiet,
        "step_s_draining": busy,
        "step_ratio": busy / quiet,
        "step_s_plain_upload": uploading,
        "step_ratio_vs_plain_upload": busy / uploading,
        "restore_s": restore,
        "dcp_fsspec_load_s": dcp_load,
        "restore_vs_dcp": restore / dcp_load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024, help="state per rank (MiB)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="matmul steps timed per phase")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args()
    os.environ.update(CREDENTIALS)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)
    work = Path(tempfile.mkdtemp(prefix="memckpt-bench-drain-", dir=a.dir))
    try:
        with s3_server() as endpoint:
            import s3fs

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(**s3fs_options(endpoint)).mkdir(bucket)
            client = client_rows(a, endpoint, bucket, work)
            args = {"size_mib": a.size_mib, "repeats": a.repeats, "steps": a.steps}
            out = run_world(rank_main, a.ranks, args, endpoint, bucket, str(work))
            figures = summarize(client, out["ranks"], a)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"memckpt drain: {a.ranks} ranks x {a.size_mib} MiB, {a.repeats} repeats, medians, "
          "local moto S3 server")  # fmt: skip
    for name, rate in figures["client_mib_s"].items():
        print(f"  client upload, {name:8s}   {rate:8.1f} MiB/s (one {a.size_mib} MiB object)")
    print(f"  drain                    {figures['drain_mib_s']:8.1f} MiB/s  "
          f"plain put_file {figures['plain_upload_mib_s']:8.1f} MiB/s  "
          f"ratio {figures['drain_vs_plain']:.2f} (target >= 0.8)")  # fmt: skip
    print(f"  training step            {figures['step_s_quiet'] * 1e3:8.2f} ms quiet  "
          f"{figures['step_s_draining'] * 1e3:8.2f} ms draining  "
          f"ratio {figures['step_ratio']:.2f} (target <= 1.05)")  # fmt: skip
    print(f"  training step            {figures['step_s_plain_upload'] * 1e3:8.2f} ms during a "
          f"plain put_file of the same bytes: drain / plain "
          f"{figures['step_ratio_vs_plain_upload']:.2f}")  # fmt: skip
    print(f"  restore                  {figures['restore_s']:8.2f} s  "
          f"dcp.load(FsspecReader) {figures['dcp_fsspec_load_s']:8.2f} s  "
          f"ratio {figures['restore_vs_dcp']:.2f} (target <= 1)")  # fmt: skip


if __name__ == "__main__":
    main()
