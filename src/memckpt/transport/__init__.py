"""Peer transfer service: the wire protocol (``memckpt.transport.protocol``) and, on top, the
server and client that move checkpoint objects between nodes."""

from __future__ import annotations

from memckpt.transport.protocol import (
    AuthenticationError,
    Frame,
    MessageType,
    ObjectRef,
    PeerClosedError,
    ProtocolError,
)

__all__ = [
    "AuthenticationError",
    "Frame",
    "MessageType",
    "ObjectRef",
    "PeerClosedError",
    "ProtocolError",
]
