"""The papers' effects in the fidelity setting, reduced (scripts/fidelity_*.py at a smaller
scale, a few minutes on 2 cores): a regression in the merge engine or the evaluation shows up
as an effect that no longer holds. ``-m slow``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import fidelity_lib as lib  # noqa: E402

pytestmark = pytest.mark.slow

SCALE = lib.Scale.reduced()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for both tests, so the base is pretrained once."""
    return tmp_path_factory.mktemp("fidelity")


def test_merging_specialists_keeps_both_skills(work: Path) -> None:
    import fidelity_merge

    result = fidelity_merge.run(work, SCALE)
    rows = result["merges"]
    for skill in lib.SKILLS:  # the fine-tunes learned their skill
        assert rows[skill][skill]["accuracy"] > rows["base"][skill]["accuracy"] + 0.1
    ties, average = fidelity_merge.kept(result, "ties"), fidelity_merge.kept(result, "average")
    # TIES keeps more of the skill that suffers most than the weight average does
    assert min(ties.values()) > min(average.values())
    assert min(ties.values()) >= 0.8
    dare = {p["drop_rate"]: p["accuracy"] for p in result["dare"]["addsub"]}
    assert dare[0.5] >= dare[0.0] - 0.1  # half the delta dropped: about the same
    assert dare[0.99] < dare[0.5]  # nearly all of it dropped: falls


def test_valve_trades_tokens_for_accuracy(work: Path) -> None:
    import fidelity_valve

    result = fidelity_valve.run(work, SCALE, alphas=(0.0, 0.5, 1.0))
    points = result["points"]
    assert result["tokens_monotone"]
    assert points[-1]["mean_tokens"] < 0.6 * points[0]["mean_tokens"]
    assert points[1]["accuracy"] >= points[0]["accuracy"] - 0.1
