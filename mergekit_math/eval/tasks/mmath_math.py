"""The hooks of math_local.yaml and aime_local.yaml. lm-eval loads this file by its path for
``!function mmath_math.process_docs`` / ``mmath_math.process_results``; the code lives in
mergekit_math.eval.math_score."""

from mergekit_math.eval.math_score import process_docs, process_results  # noqa: F401
