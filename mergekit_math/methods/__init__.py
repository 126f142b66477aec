"""Merge methods: pure functions registered once by name with typed parameters.

The contract types and the registry live in :mod:`mergekit_math.methods.base`; this face
re-exports them so callers keep importing from ``mergekit_math.methods``. The method
modules (every module of the package but ``base``, ``listing`` and private ones) are found
by scanning the package and imported on first use, so importing this package imports no
torch.
"""

from mergekit_math.methods.base import (
    _REGISTRY,
    ELEMENTWISE,
    SINGLE_THREAD_REDUCTION,
    BasePolicy,
    Chunking,
    Example,
    FusedInputs,
    MergeInputs,
    MergeMethod,
    Params,
    PrepareInputs,
    Problem,
    _load_all,
    all_methods,
    get_method,
    param_keys,
    reduce_norm,
    reduce_sum,
    register,
)

__all__ = [
    "ELEMENTWISE",
    "SINGLE_THREAD_REDUCTION",
    "BasePolicy",
    "Chunking",
    "Example",
    "FusedInputs",
    "MergeInputs",
    "MergeMethod",
    "Params",
    "PrepareInputs",
    "Problem",
    "_REGISTRY",
    "_load_all",
    "all_methods",
    "get_method",
    "param_keys",
    "reduce_norm",
    "reduce_sum",
    "register",
]
