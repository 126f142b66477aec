"""mergekit_math: delta algebra over lazily read checkpoints."""

__version__ = "0.1.0"
