"""The core engine: object format, node-local store, manifests, retention, save and load.

Nothing here imports a framework; the transport and replication layers sit beside it
and the APIs (``memckpt.manager``, ``memckpt.adapters``) on top.
"""
