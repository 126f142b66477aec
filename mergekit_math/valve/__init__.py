"""CoT-Valve: a direction Δ in weight space that sets how long a model's chains of thought are.

θ(α) = θ_long + α·Δ, with Δ = θ_short − θ_long (or a LoRA trained to shorten). Δ is stored in
the patch format (:mod:`mergekit_math.patch`); θ(α) is a task-arithmetic merge through the
engine; the sweep evaluates accuracy and generated-token counts per α; MixChain collects correct
solutions of every length for training.
"""
