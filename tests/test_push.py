"""Eval-gated publishing: the gate, the publishing card, and the upload against a fake Hub that
speaks the real ``huggingface_hub`` client's protocol (see ``hub_server.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hub_server import TOKEN, FakeHub, hub_fixture  # noqa: F401  (the `hub` fixture)

from mergekit_math.errors import UserError
from mergekit_math.hub.card import local_parents, publish_card, rows_from_lm_eval
from mergekit_math.hub.gate import Requirement, check, format_gate_table, parse_requirement
from mergekit_math.hub.push import DEFAULT_COMMIT_MESSAGE, push_model

# lm-eval 0.4 `results` for gsm8k (two filters) and a task without filter ("N/A" stderr).
LM_EVAL_RESULTS = {
    "gsm8k": {
        "alias": "gsm8k",
        "sample_len": 1319,  # lm-eval 0.4.13 bookkeeping, not a metric
        "exact_match,strict-match": 0.41,
        "exact_match_stderr,strict-match": 0.0135,
        "exact_match,flexible-extract": 0.62,
        "exact_match_stderr,flexible-extract": 0.0134,
    },
    "hendrycks_math_algebra": {
        "alias": "algebra",
        "exact_match,none": 0.2,
        "exact_match_stderr,none": "N/A",
    },
}

MERGE_CARD = textwrap.dedent(
    """\
    ---
    base_model:
    - Qwen/Qwen2.5-Math-1.5B
    - {local}
    - ./ft
    - org/not-here
    library_name: transformers
    tags:
    - merge
    - mergekit-math
    - ties
    ---

    # Merged model

    This model was made with mergekit-math 0.1.0.

    ## Method

    TIES-Merging (`ties`).

    ## Parents

    - Qwen/Qwen2.5-Math-1.5B
    - {local}
    - ./ft
    - org/not-here

    ## Recipe

    ```yaml
    ## a YAML comment, not a heading
    merge_method: ties
    ```

    Rebuild it with `mmath merge mmath_recipe.yaml OUT_DIR`.
    """
)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A merged-model folder: config, a 2 MB 'safetensors' of random bytes, a merge card, and
    junk that must not be uploaded."""
    parent = tmp_path / "parent"
    parent.mkdir()
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}) + "\n")
    (folder / "model.safetensors").write_bytes(random.Random(0).randbytes(2_000_000))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (folder / "README.md").write_text(MERGE_CARD.format(local=parent))
    (folder / "scratch.tmp").write_text("junk")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("junk")
    (folder / ".mmath-staging").mkdir()
    (folder / ".mmath-staging" / "y").write_text("junk")
    return folder


# ============================================================================ gate


@pytest.mark.parametrize(
    "text, expect",
    [
        (
            "gsm8k:exact_match,flexible-extract>=0.55",
            Requirement("gsm8k", "exact_match", "flexible-extract", ">=", 0.55),
        ),
        ("gsm8k:exact_match >= 0.5", Requirement("gsm8k", "exact_match", None, ">=", 0.5)),
        ("gsm8k:exact_match,none>0.5", Requirement("gsm8k", "exact_match", None, ">", 0.5)),
        ("math:acc <= 1e-1", Requirement("math", "acc", None, "<=", 0.1)),
        (" t:m,f < 2 ", Requirement("t", "m", "f", "<", 2.0)),
    ],
)
def test_parse_requirement(text, expect):
    req = parse_requirement(text)
    assert req == expect
    assert parse_requirement(str(req)) == req


@pytest.mark.parametrize(
    "text, why",
    [
        ("gsm8k:exact_match", "no comparison"),
        ("gsm8k exact_match>=0.5", "missing ':'"),
        ("gsm8k:exact_match>=high", "'high' is not a number"),
        ("gsm8k:exact_match>=nan", "not a finite number"),
        ("gsm8k:exact_match=0.5", "unsupported comparison '='"),
        ("gsm8k:exact_match==0.5", "unsupported comparison '=='"),
        ("gsm8k:exact_match>=0.5<1", "more than one comparison"),
        (":exact_match>=0.5", "empty task"),
        ("gsm8k:>=0.5", "empty metric"),
        ("gsm8k:exact_match,>=0.5", "empty filter"),
        ("gsm8k:exact match>=0.5", "bad metric name"),
    ],
)
def test_parse_requirement_errors(text, why):
    with pytest.raises(UserError) as err:
        parse_requirement(text)
    msg = str(err.value)
    assert repr(text) in msg and why in msg
    assert "expected TASK:METRIC[,FILTER]>=VALUE" in msg


def test_check_and_table():
    reqs = [
        parse_requirement("gsm8k:exact_match,flexible-extract>=0.6"),
        parse_requirement("gsm8k:exact_match,strict-match>=0.5"),
        parse_requirement("gsm8k:acc>=0.1"),
        parse_requirement("minerva_math:exact_match>=0.1"),
        parse_requirement("hendrycks_math_algebra:exact_match<0.3"),
    ]
    rows = check(reqs, LM_EVAL_RESULTS)
    assert [r.passed for r in rows] == [True, False, False, False, True]
    ok, low, no_metric, no_task, no_filter = rows
    assert (ok.actual, ok.stderr, ok.reason) == (0.62, 0.0134, "")
    assert low.actual == 0.41 and low.reason == "0.41 is not >= 0.5"
    assert no_metric.actual is None
    assert no_metric.reason == (
        "metric not in results; available: exact_match,strict-match, exact_match,flexible-extract"
    )
    assert no_task.reason.startswith("task not evaluated")
    assert "gsm8k" in no_task.reason
    assert no_filter.actual == 0.2 and no_filter.stderr is None  # "N/A" stderr

    table = format_gate_table(rows).splitlines()
    assert table[0].split() == ["task", "metric", "filter", "required", "actual", "result"]
    assert table[1].endswith("PASS") and "0.6200 ± 0.0134" in table[1]
    assert "FAIL" in table[2] and "0.41 is not >= 0.5" in table[2]
    assert "FAIL" in table[3] and "metric not in results" in table[3]
    assert "FAIL" in table[4] and "task not evaluated" in table[4]
    assert table[5].endswith("PASS")
    assert sum("FAIL" in line for line in table) == 3


# ============================================================================ card


def test_rows_from_lm_eval():
    rows = rows_from_lm_eval(LM_EVAL_RESULTS, {"gsm8k": 5, "hendrycks_math_algebra": 4}, limit=200)
    assert rows == [
        dict(
            task="gsm8k",
            metric="exact_match",
            filter="strict-match",
            value=0.41,
            stderr=0.0135,
            num_fewshot=5,
            limit=200,
        ),
        dict(
            task="gsm8k",
            metric="exact_match",
            filter="flexible-extract",
            value=0.62,
            stderr=0.0134,
            num_fewshot=5,
            limit=200,
        ),
        dict(
            task="hendrycks_math_algebra",
            metric="exact_match",
            filter=None,
            value=0.2,
            stderr=None,
            num_fewshot=4,
            limit=200,
        ),
    ]
    assert rows_from_lm_eval({"t": {"alias": "t", "acc": 0.5, "acc_stderr": 0.1}}) == [
        dict(
            task="t", metric="acc", filter=None, value=0.5, stderr=0.1, num_fewshot=None, limit=None
        )
    ]


def test_publish_card(model_dir: Path):
    before = (model_dir / "README.md").read_text()
    rows = rows_from_lm_eval(LM_EVAL_RESULTS, {"gsm8k": 5})
    text = publish_card(model_dir, rows, "me/qwen-math-ties")
    assert (model_dir / "README.md").read_text() == before  # not written

    meta = front_matter(text)
    assert meta["base_model"] == ["Qwen/Qwen2.5-Math-1.5B", "org/not-here"]
    assert local_parents(model_dir) == [str(model_dir.parent / "parent"), "./ft"]
    assert meta["library_name"] == "transformers" and "ties" in meta["tags"]
    [index] = meta["model-index"]
    assert index["name"] == "qwen-math-ties"
    gsm8k, algebra = index["results"]
    assert gsm8k["task"] == {"type": "text-generation"}
    assert gsm8k["dataset"] == {"name": "gsm8k", "type": "gsm8k", "args": {"num_few_shot": 5}}
    assert gsm8k["source"] == {
        "name": "lm-evaluation-harness",
        "url": "https://github.com/EleutherAI/lm-evaluation-harness",
    }
    assert gsm8k["metrics"] == [
        {"type": "exact_match", "name": "exact_match (strict-match)", "value": 0.41},
        {"type": "exact_match", "name": "exact_match (flexible-extract)", "value": 0.62},
    ]
    assert algebra["metrics"] == [{"type": "exact_match", "name": "exact_match", "value": 0.2}]

    body = text.split("---\n", 2)[2]
    # Lineage and recipe kept, local parents included; the table goes before the recipe.
    assert f"## Parents\n\n- Qwen/Qwen2.5-Math-1.5B\n- {model_dir.parent / 'parent'}\n" in body
    assert "```yaml\n## a YAML comment, not a heading\nmerge_method: ties\n```" in body
    assert body.index("## Parents") < body.index("## Evaluation") < body.index("## Recipe")
    assert "| Task | Metric | Filter | Value | n-shot |" in body
    assert "| gsm8k | exact_match | flexible-extract | 0.6200 ± 0.0134 | 5 |" in body
    assert "| hendrycks_math_algebra | exact_match | - | 0.2000 | - |" in body

    # Publishing the published card again replaces the results instead of adding to them.
    (model_dir / "README.md").write_text(text)
    again = publish_card(model_dir, rows[1:2], "me/qwen-math-ties")
    assert again.count("## Evaluation") == 1 and "strict-match" not in again
    assert len(front_matter(again)["model-index"][0]["results"][0]["metrics"]) == 1


def test_publish_card_without_readme_or_results(tmp_path: Path, model_dir: Path):
    text = publish_card(tmp_path, [dict(task="gsm8k", metric="acc", value=0.5)], "me/m")
    meta = front_matter(text)
    assert "base_model" not in meta and meta["model-index"][0]["name"] == "m"
    assert "# m\n" in text and "| gsm8k | acc | - | 0.5000 |" in text

    plain = publish_card(model_dir, None, "me/m")
    assert "model-index" not in front_matter(plain) and "## Evaluation" not in plain

    with pytest.raises(UserError, match=r"eval_results\[0\]\.value"):
        publish_card(tmp_path, [dict(task="gsm8k", metric="acc", value="high")], "me/m")


# ============================================================================ push


def test_push_uploads_folder_with_card(hub: FakeHub, model_dir: Path):
    card = publish_card(model_dir, rows_from_lm_eval(LM_EVAL_RESULTS), "me/qwen-math-ties")
    readme_before = (model_dir / "README.md").read_bytes()

    result = push_model(model_dir, "me/qwen-math-ties", token=TOKEN, private=True, card_text=card)

    repo = hub.repos["me/qwen-math-ties"]
    assert repo.private
    assert json.loads(hub.calls("create")[0].body)["visibility"] == "private"
    names = ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(repo.files) == ["README.md", *names]
    for name in names:
        assert repo.files[name] == (model_dir / name).read_bytes()
    assert repo.files["README.md"] == card.encode()
    assert (model_dir / "README.md").read_bytes() == readme_before  # folder untouched

    # The weights went through LFS (batch → PUT with the bytes → verify), the rest inline.
    [commit] = repo.commits
    assert commit.lfs_paths == {"model.safetensors"}
    [upload] = hub.calls("lfs-upload")
    assert upload.path == "/_lfs/" + hashlib.sha256(repo.files["model.safetensors"]).hexdigest()
    assert hub.calls("lfs-verify")
    lines = [json.loads(x) for x in hub.calls("commit")[0].body.splitlines()]
    assert lines[0] == {
        "key": "header",
        "value": {"summary": DEFAULT_COMMIT_MESSAGE, "description": ""},
    }
    assert {x["value"]["path"]: x["key"] for x in lines[1:]} == {
        "README.md": "file",
        "config.json": "file",
        "tokenizer.json": "file",
        "model.safetensors": "lfsFile",
    }

    meta = front_matter(repo.files["README.md"].decode())
    assert meta["base_model"] == ["Qwen/Qwen2.5-Math-1.5B", "org/not-here"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [0.41, 0.62]

    assert result.commit_id == commit.oid
    assert result.commit_url == f"{hub.url}/me/qwen-math-ties/commit/{commit.oid}"
    assert result.url == f"{hub.url}/me/qwen-math-ties" and result.pr_url is None

    # Every Hub API call carried the token; the pre-signed upload URL did not need it.
    for req in hub.requests:
        if req.route != "lfs-upload":
            assert req.headers["authorization"] == f"Bearer {TOKEN}", req.path
        assert TOKEN.encode() not in req.body
    assert not [where for where, data in hub.stored_bytes() if TOKEN.encode() in data]

    # Pushing the same folder again changes nothing and answers the same commit.
    again = push_model(model_dir, "me/qwen-math-ties", token=TOKEN, card_text=card)
    assert again.commit_id == commit.oid and len(repo.commits) == 1
    assert "visibility" not in json.loads(hub.calls("create")[1].body)


def test_push_branch_and_pull_request(hub: FakeHub, model_dir: Path):
    first = push_model(model_dir, "me/m", token=TOKEN, commit_message="first")
    (model_dir / "tokenizer.json").write_text('{"version": "2.0"}\n')
    on_branch = push_model(model_dir, "me/m", token=TOKEN, revision="dev", commit_message="dev")
    repo = hub.repos["me/m"]
    assert [c.oid for c in repo.branches["dev"]] == [first.commit_id, on_branch.commit_id]
    assert json.loads(hub.calls("create-branch")[0].body) == {}
    assert repo.branches["dev"][-1].summary == "dev"
    assert repo.files["tokenizer.json"] == b'{"version": "1.0"}\n'  # main untouched
    assert repo.files["README.md"] == (model_dir / "README.md").read_bytes()  # no card_text

    (model_dir / "config.json").write_text('{"model_type": "qwen2"}\n')
    pr = push_model(model_dir, "me/m", token=TOKEN, create_pr=True)
    assert hub.calls("commit")[-1].query == {"create_pr": "1"}
    assert hub.calls("preupload")[-1].query == {"create_pr": "1"}
    assert pr.pr_url == f"{hub.url}/me/m/discussions/1"
    assert repo.tree("refs/pr/1")["config.json"] == b'{"model_type": "qwen2"}\n'
    assert repo.files["config.json"] == b'{"model_type": "llama"}\n'  # main untouched
    assert len(repo.branches["main"]) == 1


def test_push_in_subprocess_never_shows_token(hub: FakeHub, model_dir: Path):
    """The token comes from HF_TOKEN (token=None): it reaches the Hub and nowhere else."""
    code = textwrap.dedent(
        """\
        import sys
        from pathlib import Path
        from mergekit_math.hub.card import publish_card
        from mergekit_math.hub.push import push_model
        folder = Path(sys.argv[1])
        card = publish_card(folder, [dict(task="gsm8k", metric="acc", value=0.5)], "me/sub")
        print(push_model(folder, "me/sub", token=None, card_text=card))
        """
    )
    env = {**os.environ, **hub.env, "HF_TOKEN": TOKEN}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    commit = hub.repos["me/sub"].commits[-1]
    assert commit.oid in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert {r.headers.get("authorization") for r in hub.requests if r.route != "lfs-upload"} == {
        f"Bearer {TOKEN}"
    }
    assert not [where for where, data in hub.stored_bytes() if TOKEN.encode() in data]


def test_push_refused_token_is_a_user_error(hub: FakeHub, model_dir: Path):
    wrong = "hf_wrong_SECRET999"
    with pytest.raises(UserError) as err:
        push_model(model_dir, "me/m", token=wrong)
    msg = str(err.value)
    assert msg.startswith("push to me/m failed: HTTP 401") and "HF_TOKEN" in msg
    assert wrong not in msg and "\n" not in msg
    assert hub.requests[0].headers["authorization"] == f"Bearer {wrong}"
    assert "me/m" not in hub.repos

    # A valid token the server refuses on create (and on the existence check that follows).
    hub.fail.update({"create": 401, "repo-info": 401})
    with pytest.raises(UserError, match="HTTP 401") as err:
        push_model(model_dir, "me/m", token=TOKEN)
    assert TOKEN not in str(err.value)

    hub.fail = {"commit": 403}
    with pytest.raises(UserError, match="HTTP 403: the token may not write to me") as err:
        push_model(model_dir, "me/m", token=TOKEN)
    assert TOKEN not in str(err.value)


def test_push_bad_input(tmp_path: Path, hub: FakeHub, model_dir: Path):
    with pytest.raises(UserError, match="expected NAMESPACE/NAME"):
        push_model(model_dir, "just-a-name", token=TOKEN)
    with pytest.raises(UserError, match="does not exist"):
        push_model(tmp_path / "nope", "me/m", token=TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files to upload"):
        push_model(tmp_path / "empty", "me/m", token=TOKEN)
    assert hub.requests == []


def test_push_offline_is_a_user_error(hub: FakeHub, model_dir: Path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        push_model(model_dir, "me/m", token=TOKEN)
