"""Multi-document recipes: stages merged in dependency order, intermediates cached next to
the output (see documents.py for the format, run.py for the cache)."""

from mergekit_math.stages.documents import Stage, StagedRecipe, load_staged, read_documents
from mergekit_math.stages.run import (
    MARKER,
    STAGES_SUFFIX,
    StageOptions,
    StageRun,
    plan_stages,
    run_stages,
    stage_key,
    stages_dir,
)

__all__ = [
    "MARKER",
    "STAGES_SUFFIX",
    "Stage",
    "StageOptions",
    "StageRun",
    "StagedRecipe",
    "load_staged",
    "plan_stages",
    "read_documents",
    "run_stages",
    "stage_key",
    "stages_dir",
]
