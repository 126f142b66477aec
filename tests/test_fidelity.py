"""The papers' effects in the fidelity setting, reduced (scripts/fidelity_*.py at a smaller
scale, a few minutes on 2 cores): a regression in the merge engine or the evaluation shows up
as an effect that no longer holds. ``-m fidelity`` (``make test-fidelity``); ``make test``
deselects them to keep the suite near 15 minutes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import fidelity_lib as lib  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fidelity]

SCALE = lib.Scale.reduced()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for both tests, so the base is pretrained once."""
    return tmp_path_factory.mktemp("fidelity")


def test_merging_specialists_keeps_both_skills(work: Path) -> None:
    import fidelity_merge

    result = fidelity_merge.run(work, SCALE, ("average", "task_arithmetic", "ties"), ("addsub",))
    print(fidelity_merge.table(result))
    rows = result["merges"]

    def worst(name: str) -> float:
        return min(rows[name][skill]["accuracy"] for skill in lib.SKILLS)

    for skill in lib.SKILLS:  # each fine-tune is best at its own skill
        assert rows[skill][skill]["accuracy"] > rows["base"][skill]["accuracy"]
    # each merge holds both skills better than either specialist holds the other's
    for merge in ("ties", "average"):
        assert worst(merge) > max(worst("addsub"), worst("muldiv"))
    # TIES resolves the interference that summing the deltas suffers (the full scale keeps
    # 86% / 100% against 55% / 82%; this scale 65% / 115% against 12% / 25%)
    assert worst("ties") > worst("task_arithmetic")
    dare = {p["drop_rate"]: p["accuracy"] for p in result["dare"]["addsub"]}
    assert dare[0.5] >= dare[0.0] - 0.1  # half the delta dropped: about the same
    assert dare[0.99] < dare[0.5] - 0.2  # nearly all of it dropped: falls


def test_valve_trades_tokens_for_accuracy(work: Path) -> None:
    import fidelity_valve

    result = fidelity_valve.run(work, SCALE, alphas=(0.0, 0.5, 1.0))
    print(fidelity_valve.table(result))
    points = result["points"]
    assert result["tokens_monotone"]
    assert points[-1]["mean_tokens"] < 0.6 * points[0]["mean_tokens"]
    assert points[1]["accuracy"] >= points[0]["accuracy"] - 0.1


def test_portllm_patch_ports_the_skill_to_v2(work: Path) -> None:
    import fidelity_portllm

    patches = ("dense", "lowrank_r16", "sparse_d0.1")
    result = fidelity_portllm.run(work, SCALE, ("muldiv",), patches, on_v1=("dense",))
    print(fidelity_portllm.table(result))
    rows = result["skills"]["muldiv"]
    specialist = rows["specialist"]
    # the dense patch on its own base is the specialist, up to float32 rounding
    assert abs(rows["v1+dense"]["accuracy"] - specialist["accuracy"]) <= 0.05
    # Moved to v2 without training, every patch keeps most of the specialist's accuracy (full
    # scale: 94-100%, this scale 85-100%) and brings its worked chains, which v2 alone does
    # not write (full scale 54 tokens against 20, this scale 54-57 against 28). At this scale
    # v2 alone (0.575) beats the undertrained specialist (0.50), so "beats v2" is not asserted.
    assert specialist["mean_tokens"] > 1.5 * rows["v2"]["mean_tokens"]
    for name in patches:
        ported = rows[f"v2+{name}"]
        assert ported["accuracy"] >= 0.75 * specialist["accuracy"]
        assert abs(ported["mean_tokens"] / specialist["mean_tokens"] - 1) < 0.15
    dense = rows["v2+dense"]["bytes"]
    assert rows["v2+lowrank_r16"]["bytes"] < 0.5 * dense
    assert rows["v2+sparse_d0.1"]["bytes"] < 0.25 * dense


def test_ul2r_improves_infilling_and_keeps_left_to_right(work: Path) -> None:
    import fidelity_ul2r

    result = fidelity_ul2r.run(work, SCALE, steps=100)
    print(fidelity_ul2r.table(result))
    ul2r, control = result["change"]["ul2r"], result["change"]["causal"]
    # infilling improves (full scale: -57%), and by the objective, not the extra steps: the
    # causal control on the same documents moves it by a few percent (full scale: -3%)
    assert ul2r["span_denoising"] < -0.2
    assert ul2r["span_denoising"] < control["span_denoising"] - 0.2
    assert ul2r["l2r"] < 0.05  # left-to-right stays near the base (full scale: +1.3%)
