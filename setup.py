"""The native scan kernel (memckpt.storage._scan); everything else is in pyproject.toml.

The extension is optional: without a C compiler memckpt installs and runs the same, with
the numpy check in memckpt.storage.finite instead of the fused kernel.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "memckpt.storage._scan",
            sources=["src/memckpt/storage/_scan.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
