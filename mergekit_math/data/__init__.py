"""Offline data sets for evaluating merged math models (pure stdlib; never imports torch)."""
