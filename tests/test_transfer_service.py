"""The transfer server and client in one process: round trips, and every kind of bad peer."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.errors import TransferError
from memckpt.storage.reader import load_object
from memckpt.storage.store import CheckpointStore
from memckpt.transport.client import TransferClient
from memckpt.transport.protocol import (
    HEADER,
    MAGIC,
    MessageType,
    ObjectRef,
    client_tag,
    encode_frame,
    generate_secret,
    make_nonce,
    recv_frame,
)
from memckpt.transport.server import TransferServer

SECRET = generate_secret()


@pytest.fixture
def node(shm_dir):
    """A saved object on node A (rank 0) and a live server on node B (rank 1)."""
    with memckpt.CheckpointManager(shm_dir / "a", "job", prefault=False) as m:
        sd = {"w": torch.randn(1 << 16), "n": torch.arange(100), "meta": {"step": 7}}
        m.save(7, sd, blocking=True)
    store_b = CheckpointStore(shm_dir / "b", "job", rank=1)
    server = TransferServer(store_b, SECRET, timeout_s=2.0)
    client = TransferClient("job", SECRET, rank=0, timeout_s=2.0, retries=0)
    src = shm_dir / "a" / "job" / "step-7" / "rank-0.mck"
    try:
        yield {"server": server, "store": store_b, "client": client, "src": src, "sd": sd,
               "addr": ("127.0.0.1", server.port), "dir": shm_dir}  # fmt: skip
    finally:
        client.close()
        server.close()
        store_b.close()


def _replica(n) -> Path:
    return n["dir"] / "b" / "job" / "step-7" / "rank-0.mck"


def _still_serves(n) -> None:
    assert n["client"].ping(n["addr"]) == 1


def test_put_list_get_round_trip(node, shm_dir):
    c, addr = node["client"], node["addr"]
    sent = c.put(addr, ObjectRef("job", 7, 0), node["src"])
    assert _replica(node).exists()
    assert [(o.step, o.rank) for o in c.list(addr)] == [(7, 0)]
    # fetch it back into a third node and load it
    store_c = CheckpointStore(shm_dir / "c", "job", rank=0)
    path, got = c.get(addr, ObjectRef("job", 7, 0), store_c)
    assert got == sent
    out = load_object(path, None)
    assert torch.equal(out["w"], node["sd"]["w"]) and out["meta"] == {"step": 7}
    store_c.close()


def test_large_object_moves_over_parallel_connections(shm_dir):
    with memckpt.CheckpointManager(shm_dir / "a", "job", prefault=False) as m:
        big = {"w": torch.randn(20 << 20)}  # 80 MiB: split in two 40 MiB parts
        m.save(1, big, blocking=True)
    store_b = CheckpointStore(shm_dir / "b", "job", rank=1)
    with TransferServer(store_b, SECRET) as server, TransferClient("job", SECRET) as c:
        c.put(("127.0.0.1", server.port), ObjectRef("job", 1, 0),
              shm_dir / "a" / "job" / "step-1" / "rank-0.mck")  # fmt: skip
        assert server.stats["connections"] == 2
        out = load_object(shm_dir / "b" / "job" / "step-1" / "rank-0.mck", None)
        assert torch.equal(out["w"], big["w"])
    store_b.close()


def test_ipv6_loopback(shm_dir):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    store = CheckpointStore(shm_dir / "b", "job", rank=1)
    try:
        server = TransferServer(store, SECRET, host="::1")
    except memckpt.MemckptError:
        pytest.skip("::1 not configured")
    with server, TransferClient("job", SECRET) as c:
        assert server.address.startswith("[::1]:")
        assert c.ping(("::1", server.port)) == 1
    store.close()


# -- bad peers ---------------------------------------------------------------------------
def _raw(n) -> socket.socket:
    s = socket.create_connection(n["addr"], timeout=2)
    return s


def _handshake(s: socket.socket, secret: bytes = SECRET, job: str = "job") -> None:
    cn = make_nonce()
    s.sendall(encode_frame(MessageType.HELLO, {"job_id": job, "rank": 9, "client_nonce": cn.hex()}))
    ch = recv_frame(s)
    assert ch.type is MessageType.CHALLENGE
    sn = bytes.fromhex(ch.payload["server_nonce"])
    s.sendall(encode_frame(MessageType.AUTH, {"client_tag": client_tag(secret, job, cn, sn).hex()}))


def _answer(s: socket.socket):
    try:
        return recv_frame(s, max_data=1 << 30)
    except memckpt.MemckptError:
        return None


def test_wrong_secret_gets_nothing_and_changes_nothing(node):
    s = _raw(node)
    _handshake(s, secret=generate_secret())
    reply = _answer(s)
    assert reply is not None and reply.type is MessageType.ERROR
    assert "authentication" in reply.payload["message"]
    # the server closed: a PUT after a failed handshake goes nowhere
    s.close()
    with pytest.raises(TransferError, match="job secret"):
        TransferClient("job", generate_secret(), retries=0).ping(node["addr"])
    assert node["server"].stats["rejected"] >= 1
    assert not (node["dir"] / "b" / "job" / "step-7").exists()
    _still_serves(node)


@pytest.mark.parametrize(
    "frame",
    [
        HEADER.pack(MAGIC, 1, 5, 0, 10)[:9],  # truncated header, then close
        HEADER.pack(b"HTTP", 1, 5, 0, 10),  # bad magic
        HEADER.pack(MAGIC, 2, 8, 0, 2) + b"{}",  # unknown version
        HEADER.pack(MAGIC, 1, 99, 0, 2) + b"{}",  # unknown type
        HEADER.pack(MAGIC, 1, 8, 0, 1 << 40),  # oversized control payload
        HEADER.pack(MAGIC, 1, 8, 0, 10) + b"{not json",  # truncated payload
        HEADER.pack(MAGIC, 1, 11, 0, 1 << 30),  # DATA where a request belongs
    ],
    ids=["truncated", "magic", "version", "type", "oversized", "payload", "data"],
)
def test_malformed_frames_are_rejected_and_the_server_keeps_serving(node, frame):
    for authenticated in (False, True):
        s = _raw(node)
        if authenticated:
            _handshake(s)
            assert recv_frame(s).type is MessageType.AUTH_OK
        s.sendall(frame)
        with contextlib.suppress(OSError):  # the server may have closed already
            s.shutdown(socket.SHUT_WR)
        reply = _answer(s)
        assert reply is None or reply.type is MessageType.ERROR
        s.close()
    _still_serves(node)


@pytest.mark.parametrize(
    "ref",
    [
        {"job_id": "../job", "step": 7, "rank": 0},
        {"job_id": "job/../../etc", "step": 7, "rank": 0},
        {"job_id": "job", "step": -1, "rank": 0},
        {"job_id": "job", "step": "7/../../x", "rank": 0},
        {"job_id": "job", "step": 7, "rank": "0/../../../x"},
        {"job_id": "job", "step": True, "rank": 0},
        {"job_id": "other", "step": 7, "rank": 0},
    ],
)
def test_path_tricks_cannot_read_or_write_outside_the_job(node, ref):
    before = sorted(str(p) for p in node["dir"].rglob("*"))
    for op in (MessageType.GET, MessageType.PUT):
        s = _raw(node)
        _handshake(s)
        assert recv_frame(s).type is MessageType.AUTH_OK
        payload = {**ref, "offset": 0, "nbytes": 16, "total": 4096, "transfer": "00" * 16}
        s.sendall(encode_frame(op, payload))
        if op is MessageType.PUT:
            s.sendall(HEADER.pack(MAGIC, 1, MessageType.DATA, 0, 16) + b"x" * 16)
        reply = _answer(s)
        assert reply is not None and reply.type is MessageType.ERROR, (op, reply)
        s.close()
    after = sorted(str(p) for p in node["dir"].rglob("*") if ".pool" not in str(p))
    assert after == [p for p in before if ".pool" not in p]
    _still_serves(node)


def test_corrupt_replica_is_rejected_and_never_visible(node):
    data = bytearray(node["src"].read_bytes())
    total = len(data)
    with memckpt.storage.reader.ObjectReader(node["src"]) as r:
        total = r.header.end
        data[r.index.tensors[0].offset + 5] ^= 0xFF
    s = _raw(node)
    _handshake(s)
    assert recv_frame(s).type is MessageType.AUTH_OK
    ref = {"job_id": "job", "step": 7, "rank": 0}
    s.sendall(encode_frame(MessageType.PUT, {**ref, "offset": 0, "nbytes": total, "total": total,
                                             "transfer": "11" * 16}))  # fmt: skip
    s.sendall(HEADER.pack(MAGIC, 1, MessageType.DATA, 0, total) + bytes(data[:total]))
    reply = _answer(s)
    assert reply is not None and reply.type is MessageType.ERROR
    assert "checksum" in reply.payload["message"]
    s.close()
    assert not _replica(node).exists()
    _still_serves(node)


def test_sender_vanishing_mid_transfer_leaves_nothing_visible(node):
    total = node["src"].stat().st_size
    s = _raw(node)
    _handshake(s)
    assert recv_frame(s).type is MessageType.AUTH_OK
    s.sendall(encode_frame(MessageType.PUT, {"job_id": "job", "step": 7, "rank": 0, "offset": 0,
                                             "nbytes": 8192, "total": 8192,
                                             "transfer": "22" * 16}))  # fmt: skip
    s.sendall(HEADER.pack(MAGIC, 1, MessageType.DATA, 0, 8192) + node["src"].read_bytes()[:4000])
    s.close()
    deadline = time.monotonic() + 5
    while node["server"].pending_transfers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node["server"].pending_transfers() == 0
    assert not _replica(node).exists()
    assert total > 0
    _still_serves(node)


def test_dead_or_silent_peers_give_errors_naming_peer_and_object(node):
    # a port nobody listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    c = TransferClient("job", SECRET, timeout_s=0.5, connect_timeout_s=0.5, retries=1,
                       backoff_s=0.01)  # fmt: skip
    with pytest.raises(TransferError, match=rf"job/step-7/rank-0\.mck.*127\.0\.0\.1:{dead_port}"):
        c.put(("127.0.0.1", dead_port), ObjectRef("job", 7, 0), node["src"])
    # a peer that accepts and never answers: bounded by the timeout
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="attempt 2"):
        c.ping(("127.0.0.1", silent.getsockname()[1]))
    assert time.monotonic() - t0 < 5
    silent.close()
    c.close()


def test_full_receiver_refuses_cleanly(shm_dir, node):
    store = CheckpointStore(shm_dir / "full", "job", rank=1, limit_bytes=1 << 20)
    with TransferServer(store, SECRET) as server:
        c = node["client"]
        with pytest.raises(TransferError, match="limit"):
            c.put(("127.0.0.1", server.port), ObjectRef("job", 7, 0), node["src"])
        assert c.ping(("127.0.0.1", server.port)) == 1
    store.close()


def test_many_clients_at_once(node):
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with TransferClient("job", SECRET) as c:
                for _ in range(5):
                    c.ping(node["addr"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert os.path.exists(node["src"])
    assert struct.calcsize("!4sBBHQ") == 16


def test_streaming_load_from_a_peer_fills_tensors_in_place_and_checks_chunks(shm_dir):
    with memckpt.CheckpointManager(shm_dir / "a", "job", prefault=False) as m:
        sd = {"w": torch.randn(3 << 20), "b": torch.randn(7), "step": 4}
        m.save(4, sd, blocking=True)
    src = shm_dir / "a" / "job" / "step-4" / "rank-0.mck"
    store_a = CheckpointStore(shm_dir / "a", "job", rank=1)
    with TransferServer(store_a, SECRET) as server, TransferClient("job", SECRET) as c:
        addr = ("127.0.0.1", server.port)
        dest = {"w": torch.zeros(3 << 20), "b": torch.zeros(7), "step": 0}
        w_before = dest["w"].data_ptr()
        with c.open_remote(addr, ObjectRef("job", 4, 0)) as remote:
            load_object(remote, dest)
            assert remote.bytes_received >= sd["w"].numel() * 4
        assert dest["w"].data_ptr() == w_before and torch.equal(dest["w"], sd["w"])
        assert dest["step"] == 4
        # a flipped byte on the peer is caught on arrival, naming the tensor
        with memckpt.storage.reader.ObjectReader(src) as r:
            off = next(e for e in r.index.tensors if e.name == "w").offset + 12345
        with open(src, "r+b") as f:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0x01]))
        with (
            c.open_remote(addr, ObjectRef("job", 4, 0)) as remote,
            pytest.raises(memckpt.CorruptCheckpointError, match="'w' chunk 0"),
        ):
            load_object(remote, dest)
        with pytest.raises(TransferError, match="no object"):
            c.open_remote(addr, ObjectRef("job", 5, 0))
    store_a.close()
