"""Replication and recovery speed of memckpt against raw loopback TCP, side by side.

    python benchmarks/replication.py [--size-mib 1024] [--tensors 16] [--repeats 3]

Two simulated nodes (one gloo rank each, each with its own directory under
/dev/shm and its own transfer server on 127.0.0.1). In the same run:

- raw: each rank sends ``size`` bytes to the other with ``sendall`` from memory
  into a reused mapped buffer, over 2 connections, both directions at once;
- replication: both ranks save ``size`` bytes with pairwise replication, so both
  directions run at once; the time is the handle's ``replication_s``;
- recovery: node 1's directory is deleted, both ranks reopen their managers and
  load; node 1's time covers plan + fetch + verify + load. Its baseline is a raw
  one-direction transfer of the same bytes plus a load of the object from local
  memory.

Prints medians and the ratios the project targets: replication >= 0.6x raw;
recovery <= 1.5x (raw fetch + local load).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memckpt

CONNS = 2


def make_state(rank: int, size_mib: int, n: int) -> dict[str, torch.Tensor]:
    per = size_mib * (1 << 20) // 4 // n
    g = torch.Generator().manual_seed(rank)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


# -- raw loopback baseline -------------------------------------------------------------
class RawSink:
    """Receives into one reused, pre-faulted mapped buffer over several connections."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.mm.write(b"\0" * nbytes)  # fault every page in, as the pool does
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def receive(self) -> None:
        view = memoryview(self.mm)
        part = -(-self.nbytes // CONNS)

        def one(conn: socket.socket, off: int, n: int) -> None:
            got = 0
            while got < n:
                got += conn.recv_into(view[off + got : off + n], n - got)
            conn.sendall(b"k")
            conn.close()

        threads = []
        for i in range(CONNS):
            conn, _ = self.sock.accept()
            off = i * part
            t = threading.Thread(target=one, args=(conn, off, min(part, self.nbytes - off)))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()


def raw_send(port: int, data: memoryview) -> None:
    part = -(-len(data) // CONNS)

    def one(off: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(data[off : off + part])
            s.recv(1)

    threads = [threading.Thread(target=one, args=(o,)) for o in range(0, len(data), part)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def raw_round(sink: RawSink, peer_port: int, data: memoryview, send: bool) -> float:
    """Time one transfer; with ``send`` this rank also sends (both directions at once)."""
    dist.barrier()
    t0 = time.perf_counter()
    rx = threading.Thread(target=sink.receive)
    rx.start()
    if send:
        raw_send(peer_port, data)
    rx.join()
    return time.perf_counter() - t0


# -- one rank --------------------------------------------------------------------------
def rank_main(rank: int, world: int, port: int, base: str, args: argparse.Namespace, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    node = Path(base) / f"node{rank}"
    state = make_state(rank, args.size_mib, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    res: dict[str, list[float]] = {"raw_both": [], "raw_one": [], "rep": [], "recover": [],
                                   "local_load": [], "fetch": []}  # fmt: skip

    # raw baseline, both directions at once, then one direction (the recovery baseline)
    src = torch.cat([t.view(torch.uint8) for t in state.values()])
    data = memoryview(src.numpy())
    sink = RawSink(nbytes)
    ports = [None] * world
    dist.all_gather_object(ports, sink.port)
    peer = ports[1 - rank]
    for _ in range(args.repeats):
        res["raw_both"].append(raw_round(sink, peer, data, send=True))
    for _ in range(args.repeats):
        # rank 0 sends, rank 1 receives: a raw "fetch" of node 1's bytes
        if rank == 1:
            res["raw_one"].append(raw_round(sink, peer, data, send=False))
        else:
            dist.barrier()
            raw_send(peer, data)
    sink.sock.close()
    del sink, src, data

    def manager() -> memckpt.CheckpointManager:
        return memckpt.CheckpointManager(
            node, "bench", keep_last=1, timeout_s=120, prefault=False,
            replication="pairwise", node_id=f"node{rank}", transfer_host="127.0.0.1",
        )  # fmt: skip

    m = manager()
    # the first two saves allocate the buffers that later saves and replicas reuse
    for step in range(1, args.repeats + 3):
        r = m.save(step, state).wait()
        assert r.replicated, "replication failed"
        if step > 2:
            res["rep"].append(r.replication_s)
        dist.barrier()
    m.close()

    for _ in range(args.repeats):
        dist.barrier()
        if rank == 1:
            shutil.rmtree(node)  # node 1 lost its memory
        dist.barrier()
        t0 = time.perf_counter()
        m = manager()
        m.load(state_dict=state)
        elapsed = time.perf_counter() - t0
        info = m.last_load
        assert info is not None and info.fetched == (rank == 1)
        m.wait()  # re-replication back to node 1 before the next round
        dist.barrier()
        # local load of the same object, now in this node's memory
        t1 = time.perf_counter()
        m.load(state_dict=state)
        local = time.perf_counter() - t1
        if rank == 1:
            res["recover"].append(elapsed)
            res["fetch"].append(info.fetch_s)
            res["local_load"].append(local)
        m.close()
    q.put((rank, nbytes, res))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes per rank")
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="memckpt-bench-rep-", dir=args.dir)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(r, 2, port, base, args, q)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        out = {}
        for _ in procs:
            rank, nbytes, res = q.get(timeout=1800)
            out[rank] = res
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(base, ignore_errors=True)

    med = statistics.median
    gib = nbytes / (1 << 30)
    raw_both = med(out[0]["raw_both"] + out[1]["raw_both"])
    rep = med(out[0]["rep"] + out[1]["rep"])
    raw_one = med(out[1]["raw_one"])
    local = med(out[1]["local_load"])
    recover = med(out[1]["recover"])
    fetch = med(out[1]["fetch"])
    doc = {
        "bytes_per_rank": nbytes,
        "raw_loopback_both_directions_s": raw_both,
        "raw_loopback_GBps_per_direction": nbytes / raw_both / 1e9,
        "replication_s": rep,
        "replication_GBps_per_direction": nbytes / rep / 1e9,
        "replication_vs_raw": raw_both / rep,
        "raw_fetch_one_direction_s": raw_one,
        "local_load_s": local,
        "recovery_s": recover,
        "recovery_fetch_part_s": fetch,
        "recovery_vs_raw_fetch_plus_load": recover / (raw_one + local),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{gib:.2f} GiB per rank, 2 simulated nodes, medians of {args.repeats}")
    print(f"raw loopback, 2 conns, both ways  {raw_both:7.3f} s  "
          f"{doc['raw_loopback_GBps_per_direction']:.2f} GB/s per direction")  # fmt: skip
    print(f"memckpt replication, both ways    {rep:7.3f} s  "
          f"{doc['replication_GBps_per_direction']:.2f} GB/s per direction")  # fmt: skip
    print(f"  ratio replication / raw         {doc['replication_vs_raw']:7.2f}  (target >= 0.6)")
    print(f"raw fetch (one way) + local load  {raw_one:7.3f} + {local:.3f} s")
    print(f"memckpt recovery of node 1        {recover:7.3f} s  (fetch+verify {fetch:.3f} s)")
    ratio = doc["recovery_vs_raw_fetch_plus_load"]
    print(f"  ratio recovery / (raw + load)   {ratio:7.2f}  (target <= 1.5)")


if __name__ == "__main__":
    sys.exit(main())
