"""Framework APIs, each a thin client of the engine (``memckpt.core``). An adapter imports its
framework only when used."""
