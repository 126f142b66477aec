"""PortLLM portable patches: extract a fine-tune's delta (dense, low-rank or sparse), import a
PEFT LoRA adapter, and apply a patch to a new base.

The engine can treat a patch as a source through :class:`Patch`: ``Patch.open(path)``,
``.tensors`` (name -> :class:`PatchEntry`), ``.delta(name, dtype)``, ``.check_against(ckpt)``.
Nothing here imports torch at import time.
"""

from mergekit_math.patch.format import FORMAT_VERSION, Patch, PatchEntry, PatchManifest

__all__ = ["FORMAT_VERSION", "Patch", "PatchEntry", "PatchManifest"]
