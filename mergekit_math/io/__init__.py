"""Lazy checkpoint reading, streaming sharded writing, and model-file copying."""
