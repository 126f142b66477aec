"""Compatibility with recipes written for mergekit, without giving up strictness.

mergekit never checks parameter names: a key its method does not read is silently dropped
(a typo like ``densty`` too). mmath refuses unknown names, except:

- names that published mergekit recipes set on a method that does not read them
  (:data:`NO_EFFECT`, measured on real recipes): accepted with a warning that says so;
- with ``--lenient`` (for imported recipes), every unknown parameter and every unknown
  recipe key: a warning instead of an error.

mergekit 0.1.5's method specs (``merge_methods/*``) declare exactly the parameters of the
mmath method of the same name (``tests/test_architectures.py`` checks this against the installed
mergekit), so no name comes from there: the table lists what recipes set beyond the specs.
"""

from __future__ import annotations

from mergekit_math.lenient import LENIENT_HINT

__all__ = ["LENIENT_HINT", "NO_EFFECT", "no_effect", "no_effect_warning"]

# method -> parameters set by published mergekit recipes that mergekit 0.1.5 ignores for it.
NO_EFFECT: dict[str, tuple[str, ...]] = {
    "model_stock": ("weight",),  # model_stock's weights come from the angle between deltas
    "slerp": ("normalize",),  # linear's normalize; slerp interpolates two models by t
    "dare_ties": ("int_space",),  # read by no mergekit 0.1.5 method
}


def no_effect(method: str, key: str) -> bool:
    """Whether ``key`` is accepted (with a warning) for ``method`` though it has no effect."""
    return key in NO_EFFECT.get(method, ())


def no_effect_warning(path: str, key: str, method: str) -> str:
    return f"{path}: {key!r} has no effect for {method} (mergekit ignores it too); it is ignored"
