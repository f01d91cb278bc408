"""Compiled CPU kernels: fused C++ ops built on first use, pure TF as the fallback.

See :mod:`sparselayers.ops.compiled.build` for the build, its cache and
fallback, and :mod:`sparselayers.ops.compiled.kernels` for the kernels.
"""

from sparselayers.ops.compiled.build import ENABLED_ENV, available, enabled
from sparselayers.ops.compiled.kernels import (
    COMPILED, CompiledBlockKernel, CompiledCSRKernel, CompiledKernel, accelerated, compiled_allowed, pure_tf_kernel,
)

__all__ = [
    "COMPILED", "ENABLED_ENV", "CompiledBlockKernel", "CompiledCSRKernel", "CompiledKernel", "accelerated", "available", "compiled_allowed", "enabled",
    "pure_tf_kernel",
]
