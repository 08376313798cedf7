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

    python benchmarks/replication.py --cap [--size-mib 128] [--repeats 3]

The bandwidth cap (``replication_bandwidth``) on the same two nodes:

- replication time with the cap at 25 %, 50 % and 100 % of the measured raw
  loopback rate (per direction; each node pushes one direction), and without a
  cap: the achieved rate against the cap;
- the step time of a gloo all-reduce loop (``--allreduce-mib`` per step plus
  ``--compute-ms`` of "compute") while a save replicates, uncapped, capped at
  25 %, and paused around each all-reduce (``mgr.replication_paused()``), against
  the loop alone. On a machine with few cores most of the effect is CPU, not
  network: read the figures as relative.
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


# -- the bandwidth cap (--cap) -----------------------------------------------------------------
CAP_FRACTIONS = (1.0, 0.5, 0.25)
LOOP_CAP = 0.25  # the cap of the all-reduce scenario, as a fraction of raw loopback


def allreduce_loop(
    m: memckpt.CheckpointManager | None, state: dict, step: int, buf: torch.Tensor,
    compute_s: float, pause: bool,
) -> tuple[list[float], float]:  # fmt: skip
    """All-reduce steps while a save replicates (or a fixed count without ``m``).

    Every step all-reduces ``buf``, whose last element carries "my save is done", so
    all ranks stop at the same step. Returns (step times during replication, the
    save's replication_s).
    """
    handle = m.save(step, state) if m is not None else None
    times: list[float] = []
    for i in range(10_000):
        t0 = time.perf_counter()
        time.sleep(compute_s)
        buf[-1] = 1.0 if handle is None or handle.done() else 0.0
        if pause and m is not None:
            with m.replication_paused():
                dist.all_reduce(buf)
        else:
            dist.all_reduce(buf)
        all_done = buf[-1].item() >= dist.get_world_size()
        times.append(time.perf_counter() - t0)
        if (handle is None and i >= 40) or (handle is not None and all_done):
            break
    rep_s = handle.wait().replication_s if handle is not None else 0.0
    return times, rep_s


def cap_rank_main(rank: int, world: int, port: int, base: str, args: argparse.Namespace,
                  q) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    node = Path(base) / f"node{rank}"
    state = make_state(rank, args.size_mib, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    res: dict[str, object] = {}

    src = torch.cat([t.view(torch.uint8) for t in state.values()])
    data = memoryview(src.numpy())
    sink = RawSink(nbytes)
    ports = [None] * world
    dist.all_gather_object(ports, sink.port)
    raw = [raw_round(sink, ports[1 - rank], data, send=True) for _ in range(args.repeats)]
    sink.sock.close()
    del sink, src, data
    # every rank takes the same cap: rank 0's measure
    raw_rate = [nbytes / statistics.median(raw)]
    dist.broadcast_object_list(raw_rate, src=0)
    res["raw_Bps"] = raw_rate[0]

    def manager(job: str, fraction: float | None) -> memckpt.CheckpointManager:
        cap = None if fraction is None else fraction * raw_rate[0]
        return memckpt.CheckpointManager(
            node, job, keep_last=1, timeout_s=120, prefault=False, replication="pairwise",
            node_id=f"node{rank}", transfer_host="127.0.0.1", replication_bandwidth=cap,
        )  # fmt: skip

    # replication time and achieved rate at each cap
    rates: dict[str, list[float]] = {}
    for fraction in (None, *CAP_FRACTIONS):
        key = "none" if fraction is None else f"{fraction:.0%}"
        with manager(f"cap-{key.rstrip('%')}", fraction) as m:
            for step in range(1, args.repeats + 3):
                r = m.save(step, state).wait()
                assert r.replicated, "replication failed"
                if step > 2:  # the first two saves allocate the buffers
                    rates.setdefault(key, []).append(r.replication_s)
                dist.barrier()
    res["rep_s"] = rates

    # an all-reduce loop while a save replicates
    buf = torch.zeros(args.allreduce_mib * (1 << 20) // 4)
    compute_s = args.compute_ms / 1000
    loops: dict[str, tuple[list[float], float]] = {}
    loops["no replication"] = allreduce_loop(None, state, 0, buf, compute_s, False)
    for key, fraction, pause in (("uncapped", None, False),
                                 (f"cap {LOOP_CAP:.0%}", LOOP_CAP, False),
                                 ("paused in all-reduce", None, True)):  # fmt: skip
        with manager(f"loop-{len(loops)}", fraction) as m:
            if pause:  # a process that pauses cuts uncapped parts into chunks from then on
                m.pause_replication()
                m.resume_replication()
            for step in (1, 2):  # warm the buffers, as above
                m.save(step, state).wait()
                dist.barrier()
            loops[key] = allreduce_loop(m, state, 3, buf, compute_s, pause)
            dist.barrier()
    res["loops"] = loops
    q.put((rank, nbytes, res))
    dist.barrier()
    dist.destroy_process_group()


def report_cap(out: dict[int, dict], nbytes: int, args: argparse.Namespace) -> None:
    med = statistics.median
    raw = out[0]["raw_Bps"]
    caps: dict[str, dict[str, float | None]] = {}
    for key in out[0]["rep_s"]:
        seconds = med(out[0]["rep_s"][key] + out[1]["rep_s"][key])
        cap = None if key == "none" else float(key.rstrip("%")) / 100 * raw
        achieved = nbytes / seconds
        caps[key] = {"cap_Bps": cap, "replication_s": seconds, "achieved_Bps": achieved,
                     "achieved_vs_cap": achieved / cap if cap else None}  # fmt: skip
    loops: dict[str, dict[str, float]] = {}
    for key in out[0]["loops"]:
        steps = out[0]["loops"][key][0] + out[1]["loops"][key][0]
        p90 = statistics.quantiles(steps, n=10)[-1] if len(steps) > 1 else steps[0]
        loops[key] = {
            "steps": len(steps) // 2,
            "median_ms": med(steps) * 1e3,
            "p90_ms": p90 * 1e3,
            "replication_s": max(out[r]["loops"][key][1] for r in out),
        }
    doc = {"bytes_per_rank": nbytes, "raw_loopback_Bps_per_direction": raw, "caps": caps,
           "allreduce": loops}  # fmt: skip
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{nbytes / (1 << 20):.0f} MiB per rank, 2 simulated nodes, medians of {args.repeats}")
    print(f"raw loopback, 2 conns, both ways: {raw / 1e9:.2f} GB/s per direction")
    print(f"{'cap':>6} {'cap GB/s':>9} {'replication s':>14} {'achieved GB/s':>14} {'vs cap':>7}")
    for key, d in caps.items():
        cap = f"{d['cap_Bps'] / 1e9:.2f}" if d["cap_Bps"] else "-"
        vs = f"{d['achieved_vs_cap']:.2f}" if d["achieved_vs_cap"] else "-"
        print(f"{key:>6} {cap:>9} {d['replication_s']:>14.3f} "
              f"{(d['achieved_Bps'] or 0) / 1e9:>14.2f} {vs:>7}")  # fmt: skip
    print(f"all-reduce of {args.allreduce_mib} MiB + {args.compute_ms} ms compute per step, "
          "while a save replicates:")  # fmt: skip
    print(f"{'scenario':>22} {'steps':>6} {'median ms':>10} {'p90 ms':>8} {'replication s':>14}")
    for key, d2 in loops.items():
        print(f"{key:>22} {d2['steps']:>6.0f} {d2['median_ms']:>10.1f} {d2['p90_ms']:>8.1f} "
              f"{d2['replication_s']:>14.3f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=None,
                    help="bytes per rank (default 1024; 128 with --cap)")  # fmt: skip
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cap", action="store_true", help="the bandwidth cap and pause (see above)")
    ap.add_argument("--allreduce-mib", type=int, default=4, help="--cap: all-reduce size")
    ap.add_argument("--compute-ms", type=float, default=5.0, help="--cap: compute per step")
    args = ap.parse_args()
    if args.size_mib is None:
        args.size_mib = 128 if args.cap else 1024
    base = tempfile.mkdtemp(prefix="memckpt-bench-rep-", dir=args.dir)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = cap_rank_main if args.cap else rank_main
    procs = [ctx.Process(target=target, args=(r, 2, port, base, args, q)) for r in range(2)]
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
    if args.cap:
        report_cap(out, nbytes, args)
        return

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
