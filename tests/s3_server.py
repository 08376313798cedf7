"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1.

memckpt reaches it exactly as it reaches AWS or MinIO: through s3fs, with an endpoint URL and
credentials. Tests take the ``s3`` fixture (tests/conftest.py); it skips when s3fs or moto's
server is not installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from memckpt.engine.drain import DrainPolicy

# fail fast against a dead endpoint: the drain's own policy does the retrying
FAST_CLIENT = {
    "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
}
FAST_POLICY = DrainPolicy(attempts=2, backoff_s=0.05, backoff_cap_s=0.1, attempt_timeout_s=10,
                          part_wait_s=5, circuit_after=1, circuit_open_s=0.3)  # fmt: skip


@dataclass
class S3:
    server: Any
    port: int
    endpoint: str
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/ckpt"

    def options(self, **kw: Any) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "skip_instance_cache": True, **FAST_CLIENT, **kw}

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        from moto import server as moto_server

        self.server = moto_server.ThreadedMotoServer("127.0.0.1", self.port, verbose=False)
        self.server.start()


def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A moto S3 server on a free port of 127.0.0.1 with one empty bucket (the ``s3`` fixture)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    server = moto_server.ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = S3(server, port, f"http://127.0.0.1:{port}", f"b-{uuid.uuid4().hex[:12]}")
    import s3fs

    s3fs.S3FileSystem(endpoint_url=env.endpoint, skip_instance_cache=True).mkdir(env.bucket)
    try:
        yield env
    finally:
        env.stop()
