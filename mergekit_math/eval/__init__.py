"""Evaluation with lm-eval: shipped offline math tasks, a result cache and chain-of-thought
length statistics (`mmath eval`)."""
