"""The storage layer: everything about bytes on one node, below transport and the engine.

The object format (header, index, aligned tensor bytes, per-chunk checksums), state-dict
flattening and the restricted loader, the buffer pool, the node-local store, step
manifests and inventories, and the pure retention policy. The trust rules for the job
tree live here: nothing read from it may run code, follow a symlink or block.
"""
