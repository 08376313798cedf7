"""Tools built on the library: the ``memckpt`` command, offline catalog and status, launch,
preemption drills and the demo."""
