"""Sweeps over merge settings: `mmath sweep RECIPE --set KEY=VALUES ... --tasks T -o DIR`.

A sweep is a set of *points*, each a recipe with some keys set (``models[1].parameters.weight``,
``parameters.density``, ``seed``). Every point is merged into a scratch folder, evaluated with
lm-eval and recorded as one line of ``SWEEP_DIR/results.jsonl``; the weights are deleted
unless kept. Points run in-process, in local worker processes or as Ray tasks; a rerun skips
the points already recorded.

- :mod:`~mergekit_math.sweep.grid`: ``--set`` parsing, settable keys, grid and random points;
- :mod:`~mergekit_math.sweep.results`: the results file and the sweep's manifest;
- :mod:`~mergekit_math.sweep.point`: one point, start to finish (what a worker runs);
- :mod:`~mergekit_math.sweep.runner`: planning a sweep and running it locally;
- :mod:`~mergekit_math.sweep.ray_backend`: running it on a Ray cluster;
- :mod:`~mergekit_math.sweep.report`: ``report.md``, ``sweep.png``, ``best_recipe.yaml``.

Nothing here imports torch, lm-eval, Ray or matplotlib at import time.
"""
