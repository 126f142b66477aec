"""UL2R continued training: a mixture of denoisers for an existing causal LM.

``config`` (schema, validation), ``presets`` (ul2r, ul2, causal-mix and the commented YAML),
``denoise`` (span corruption, prefix LM, causal LM as pure functions), ``mixture`` (denoiser
and source sampling, domain-upsampling phases), ``data`` (files, document index, token
streams), ``tokens`` (sentinels and mode tokens), ``batch`` (tensors and 4-D prefix-LM masks),
``train`` (the loop, checkpoints, resume) and ``preview``. Importing this package imports
neither torch nor transformers.
"""
