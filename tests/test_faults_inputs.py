"""Fault suite for the files mmath reads: indexes, headers, pickles, patches and adapters that
point outside their folder, are corrupt, or change while a merge runs.

Each fault must end in exit code 2 and exactly one ``error:`` line naming the file and the
entry, with nothing written at OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_dir, mmath, write_recipe

from mergekit_math.errors import UserError


def assert_one_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.mmath-*"))


def linear_recipe(tmp_path: Path, first: Path, second: Path) -> Path:
    return write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
models:
  - model: {first}
    parameters: {{weight: 1}}
  - model: {second}
    parameters: {{weight: 1}}
""",
    )


def merge_fails(tmp_path: Path, bad: Path, other: Path, *needles: str) -> str:
    out = tmp_path / "out"
    res = mmath("merge", linear_recipe(tmp_path, bad, other), out)
    line = assert_one_error(res, *needles)
    assert_nothing_written(out)
    return line


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def shard_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


# =============================================================================== containment


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_must_stay_inside_the_model_folder(tmp_path, zoo, how):
    # The file outside is a valid shard: before the fix it was read and merged, exit 0.
    outside = copy_model(zoo["a"], tmp_path / "elsewhere")
    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "model.safetensors").unlink()
    names = list(load_dir(outside))
    if how == "dotdot":
        target = "../elsewhere/model.safetensors"
    elif how == "absolute":
        target = str(outside / "model.safetensors")
    else:
        (model / "shard.safetensors").symlink_to(outside / "model.safetensors")
        target = "shard.safetensors"
    shard_index(model, {n: target for n in names})
    line = merge_fails(tmp_path, model, zoo["b"], "model.safetensors.index.json", "weight_map[")
    assert repr(target) in line
    assert "absolute path" in line if how == "absolute" else "outside the folder" in line


def test_etc_passwd_in_an_index_is_refused_before_it_is_opened(tmp_path, zoo, monkeypatch):
    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "model.safetensors").unlink()
    shard_index(model, {"model.embed_tokens.weight": "../../../../../../../../etc/passwd"})
    opened: list[str] = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    merge_fails(tmp_path, model, zoo["b"], "weight_map['model.embed_tokens.weight']", "passwd")
    assert not any("passwd" in p for p in opened)


def test_symlinks_that_stay_inside_and_hub_cache_blobs_are_followed(tmp_path, zoo):
    from mergekit_math.io.reader import Checkpoint

    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "sub").mkdir()
    os.replace(model / "model.safetensors", model / "sub" / "real.safetensors")
    (model / "model.safetensors").symlink_to("sub/real.safetensors")
    assert len(Checkpoint(model).tensors) == len(load_dir(zoo["a"]))
    # A Hub cache snapshot: every file is a link to ../../blobs/HASH.
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in zoo["a"].iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    assert len(Checkpoint(snap).tensors) == len(load_dir(zoo["a"]))


def test_tokenizer_file_linked_out_of_the_folder_is_refused_at_planning(tmp_path, zoo):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    merge_fails(tmp_path, model, zoo["b"], "tokenizer.json", "outside the folder")


def test_fingerprint_refuses_weights_linked_out_of_the_folder(tmp_path, zoo):
    from mergekit_math.io.fingerprint import model_fingerprint

    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(zoo["b"] / "model.safetensors")
    with pytest.raises(UserError, match="model.safetensors.*outside the folder"):
        model_fingerprint(model, memo=False)


@pytest.fixture(scope="module")
def patch_dir(zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_patch") / "p"
    res = mmath("patch", "extract", "--base", zoo["base"], "--finetuned", zoo["a"], "-o", out, "-q")
    assert res.exit_code == 0, res.output
    return out


def patch_apply(patch: Path, base: Path, out: Path):
    return mmath("patch", "apply", "--patch", patch, "--base", base, "-o", out, "-q")


@pytest.mark.parametrize("name", ["patch.json", "patch.safetensors"])
def test_patch_files_linked_out_of_the_folder_are_refused(tmp_path, zoo, patch_dir, name):
    outside = copy_model(patch_dir, tmp_path / "elsewhere")
    patch = copy_model(patch_dir, tmp_path / "p")
    (patch / name).unlink()
    (patch / name).symlink_to(outside / name)
    out = tmp_path / "out"
    assert_one_error(patch_apply(patch, zoo["base"], out), name, "outside the folder")
    assert_nothing_written(out)


def test_adapter_files_linked_out_of_the_folder_are_refused(tmp_path, zoo):
    from safetensors.torch import save_file

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
        },
        str(elsewhere / "adapter_model.safetensors"),
    )
    out = tmp_path / "p"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        adapter = tmp_path / f"adapter-{name}"
        adapter.mkdir()
        for f in elsewhere.iterdir():
            shutil.copy(f, adapter / f.name)
        (adapter / name).unlink()
        (adapter / name).symlink_to(elsewhere / name)
        res = mmath("patch", "extract", "--base", zoo["base"], "--from-lora", adapter, "-o", out)
        assert_one_error(res, name, "outside the folder")
        assert_nothing_written(out)


# =============================================================================== changed inputs


def _plan(tmp_path: Path, first: Path, second: Path):
    from mergekit_math.merge import build_plan
    from mergekit_math.recipe import load_recipe

    recipe = linear_recipe(tmp_path, first, second)
    return build_plan(load_recipe(recipe), recipe_dir=tmp_path)


@pytest.mark.parametrize("change", ["replace", "truncate", "rewrite"])
def test_input_changed_between_planning_and_reading_stops_the_merge(tmp_path, zoo, change):
    from mergekit_math.merge import execute

    model = copy_model(zoo["a"], tmp_path / "m")
    shard = model / "model.safetensors"
    plan = _plan(tmp_path, model, zoo["b"])
    if change == "replace":  # another valid checkpoint of the same shapes: values would change
        tmp = model / "new.tmp"
        shutil.copy(zoo["c"] / "model.safetensors", tmp)
        os.replace(tmp, shard)
    elif change == "truncate":  # reading a mapping past the new end would be a SIGBUS
        os.truncate(shard, shard.stat().st_size // 2)
    else:  # same size, same inode, other bytes
        data = bytearray(shard.read_bytes())
        data[-8:] = b"\xff" * 8
        with open(shard, "r+b") as f:
            f.write(data)
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"m/model.safetensors changed during the merge .*nothing"):
        execute(plan, out, progress=False)
    assert_nothing_written(out)


def test_input_replaced_mid_merge_stops_at_the_next_read(tmp_path, zoo, monkeypatch):
    from mergekit_math.io.input_file import InputFile
    from mergekit_math.merge import execute

    model = copy_model(zoo["a"], tmp_path / "m")
    shard = model / "model.safetensors"
    plan = _plan(tmp_path, model, zoo["b"])
    reads: list[int] = []
    check = InputFile.check

    # Swap the shard right after the check before its first read (a mapping or a pread keeps
    # reading the planned inode, so that read still gets the planned bytes). The reader thread
    # runs ahead of the writer by up to its IO budget (more than this whole model), so swapping
    # after the first *written* tensor raced with everything having been read already.
    def swap_after_first_check(self) -> int:
        fd = check(self)
        if self.path == shard:
            if not reads:
                os.replace(shutil.copy(zoo["c"] / "model.safetensors", model / "x.tmp"), shard)
            reads.append(fd)
        return fd

    monkeypatch.setattr(InputFile, "check", swap_after_first_check)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="replaced by another file"):
        execute(plan, out, progress=False, chunk_elements=64)
    assert len(reads) == 1  # the first read went through; the check before the next one raised
    assert_nothing_written(out)


def test_truncated_input_is_refused_before_it_is_mapped(tmp_path, zoo):
    from mergekit_math.io.reader import Checkpoint

    model = copy_model(zoo["a"], tmp_path / "m")
    shard = model / "model.safetensors"
    ckpt = Checkpoint(model)
    os.truncate(shard, 100)
    for name in ("lm_head.weight", "model.norm.weight"):
        with pytest.raises(UserError, match="changed during the merge"):
            ckpt.read_range(name, 0, 8)  # a view of the mapping: would be a SIGBUS


def test_checkpoint_reads_through_the_handle_kept_since_planning(tmp_path, zoo):
    from mergekit_math.io.reader import Checkpoint

    model = copy_model(zoo["a"], tmp_path / "m")
    ckpt = Checkpoint(model)
    name = "model.norm.weight"
    want = load_dir(zoo["a"])[name]
    assert torch.equal(ckpt.read(name), want)
    os.replace(
        shutil.copy(zoo["b"] / "model.safetensors", model / "x.tmp"), model / "model.safetensors"
    )
    buf = torch.empty(want.numel() * 4, dtype=torch.uint8)
    for read in (lambda: ckpt.read(name), lambda: ckpt.read_range(name, 0, 4, out=buf)):
        with pytest.raises(UserError, match="replaced by another file"):
            read()
    # Closed and reopened later: refused too, the path is another file now.
    ckpt.close()
    with pytest.raises(UserError, match="replaced by another file"):
        ckpt.read_range(name, 0, 4)


def test_patch_replaced_after_opening_stops_the_apply(tmp_path, zoo, patch_dir):
    from mergekit_math.patch.format import Patch

    patch = copy_model(patch_dir, tmp_path / "p")
    opened = Patch.open(patch)
    name = next(iter(opened.tensors))
    first = opened.delta(name)
    shutil.copy(patch / "patch.safetensors", patch / "x.tmp")
    os.replace(patch / "x.tmp", patch / "patch.safetensors")
    with pytest.raises(UserError, match="patch.safetensors changed during the merge"):
        opened.delta(name)
    assert first.numel()


# =============================================================================== headers


def _st_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(offsets: Any, shape: Any = (2,), dtype: Any = "F32") -> dict:
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape}
    entry["data_offsets"] = offsets
    return {k: v for k, v in entry.items() if v is not ...}


HEADER_FAULTS = {
    "list": ([{"w": _t([0, 8])}], 8, ["not an object", "list"]),
    "entry a number": ({"w": 5}, 8, ["tensor w", "not an object"]),
    "dtype missing": ({"w": _t([0, 8], dtype=...)}, 8, ["tensor w", "no dtype"]),
    "dtype unknown": ({"w": _t([0, 8], dtype="F7")}, 8, ["tensor w", "unsupported dtype F7"]),
    "shape null": ({"w": _t([0, 8], shape=None)}, 8, ["tensor w", "shape None"]),
    "shape negative": ({"w": _t([0, 8], shape=[-2])}, 8, ["tensor w", "shape [-2]"]),
    "shape missing": ({"w": _t([0, 8], shape=...)}, 8, ["tensor w", "shape"]),
    "shape bool": ({"w": _t([0, 8], shape=[True, 2])}, 8, ["tensor w", "shape"]),
    "offsets string": ({"w": _t("0,8")}, 8, ["tensor w", "data_offsets '0,8'"]),
    "offsets one": ({"w": _t([8])}, 8, ["tensor w", "data_offsets [8]"]),
    "offsets negative": ({"w": _t([-8, 0])}, 8, ["tensor w", "data_offsets [-8, 0]"]),
    "offsets float": ({"w": _t([0.0, 8.0])}, 8, ["tensor w", "data_offsets"]),
    "begin after end": ({"w": _t([8, 0])}, 8, ["tensor w", "end before they begin"]),
    "size mismatch": ({"w": _t([0, 12])}, 12, ["tensor w", "inconsistent data offsets"]),
    "overlap": (
        {"a": _t([0, 8]), "b": _t([4, 12])},
        12,
        ["tensor b", "overlap another tensor"],
    ),
    "same range twice": ({"a": _t([0, 8]), "b": _t([0, 8])}, 8, ["tensor b", "overlap"]),
    "gap": ({"a": _t([0, 8]), "b": _t([12, 20])}, 20, ["tensor b", "gap"]),
    "data past the end": ({"w": _t([0, 8])}, 4, ["truncated", "tensor w"]),
    "trailing bytes": ({"w": _t([0, 8])}, 16, ["8 bytes after the last tensor"]),
    "no tensors": ({}, 0, ["no tensors"]),
    "only metadata": ({"__metadata__": {"format": "pt"}}, 0, ["no tensors"]),
    "metadata not strings": (
        {"__metadata__": {"n": 1}, "w": _t([0, 8])},
        8,
        ["__metadata__ is not a map of strings"],
    ),
    "metadata a list": ({"__metadata__": ["x"], "w": _t([0, 8])}, 8, ["__metadata__"]),
    "duplicate name": (
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{}}',
        8,
        ["duplicate key 'w'"],
    ),
    "not json": (b"{not json", 0, ["corrupt safetensors header"]),
    "not utf-8": (b'{"\xff": 1}', 0, ["corrupt safetensors header"]),
}


@pytest.mark.parametrize("fault", HEADER_FAULTS)
def test_corrupt_safetensors_headers_are_refused_at_planning(tmp_path, zoo, fault):
    header, data_len, needles = HEADER_FAULTS[fault]
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(zoo["a"] / "config.json", model / "config.json")
    (model / "model.safetensors").write_bytes(_st_bytes(header, b"\0" * data_len))
    merge_fails(tmp_path, model, zoo["b"], "m/model.safetensors", *needles)


def test_header_length_past_the_end_of_the_file_says_truncated(tmp_path, zoo):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(zoo["a"] / "config.json", model / "config.json")
    (model / "model.safetensors").write_bytes(_st_bytes({"w": _t([0, 8])}, length=10_000))
    merge_fails(tmp_path, model, zoo["b"], "model.safetensors: truncated", "header is 10000")


def test_truncated_shard_is_refused_at_planning_before_any_read(tmp_path, zoo):
    model = copy_model(zoo["a"], tmp_path / "m")
    shard = model / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 4)
    merge_fails(tmp_path, model, zoo["b"], "model.safetensors: truncated", "ends at data byte")


def test_tensor_stored_in_two_shards_is_refused(tmp_path, zoo):
    model = copy_model(zoo["a"], tmp_path / "m")
    shutil.copy(model / "model.safetensors", model / "model-2.safetensors")
    names = list(load_dir(zoo["a"]))
    shard_index(
        model,
        {n: ("model.safetensors" if i % 2 else "model-2.safetensors") for i, n in enumerate(names)},
    )
    merge_fails(tmp_path, model, zoo["b"], "is stored twice")


# =============================================================================== index, config


INDEX_FAULTS = {
    "invalid json": ('{"weight_map": {', ["model.safetensors.index.json", "invalid JSON"]),
    "a list": ("[1, 2]", ["model.safetensors.index.json", "a JSON list, expected an object"]),
    "no weight_map": ('{"metadata": {}}', ["model.safetensors.index.json", "no weight_map"]),
    "weight_map a list": ('{"weight_map": ["a"]}', ["no weight_map"]),
    "shard a number": ('{"weight_map": {"w": 3}}', ["weight_map['w']", "3 is not a file name"]),
    "shard empty": ('{"weight_map": {"w": ""}}', ["weight_map['w']", "is not a file name"]),
}


@pytest.mark.parametrize("fault", INDEX_FAULTS)
def test_bad_index_files_are_one_error(tmp_path, zoo, fault):
    text, needles = INDEX_FAULTS[fault]
    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(text)
    merge_fails(tmp_path, model, zoo["b"], *needles)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"[1, 2]", "a JSON list, expected an object"),
        (b"{", "invalid JSON"),
        (b'{"a": "\xff"}', "invalid JSON"),
    ],
)
def test_bad_config_json_is_one_error(tmp_path, zoo, content, needle):
    model = copy_model(zoo["a"], tmp_path / "m")
    (model / "config.json").write_bytes(content)
    merge_fails(tmp_path, model, zoo["b"], "m/config.json", needle)


# =============================================================================== pickles


def _pickle_model(tmp_path: Path, zoo: dict, write) -> Path:
    model = copy_model(zoo["a"], tmp_path / "pk")
    (model / "model.safetensors").unlink()
    write(model / "pytorch_model.bin")
    return model


def merge_pickle(tmp_path: Path, model: Path, zoo: dict):
    out = tmp_path / "out"
    return mmath("merge", linear_recipe(tmp_path, model, zoo["b"]), out, "--allow-pickle"), out


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, zoo):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = _pickle_model(tmp_path, zoo, lambda p: torch.save({"w": Evil()}, p))
    res, out = merge_pickle(tmp_path, model, zoo)
    assert_one_error(
        res, "pytorch_model.bin: refused by torch.load(weights_only=True)", "posix.system"
    )
    assert not marker.exists()
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\x00garbage" * 64, "Unsupported operand"),
        (b"PK\x03\x04" + b"\x00" * 200, "zip archive"),
        (b"\x80\x02", "EOFError"),
    ],
)
def test_corrupt_pickle_is_not_a_readable_checkpoint(tmp_path, zoo, content, needle):
    model = _pickle_model(tmp_path, zoo, lambda p: p.write_bytes(content))
    res, out = merge_pickle(tmp_path, model, zoo)
    assert_one_error(res, "pytorch_model.bin: not a readable PyTorch checkpoint", needle)
    assert_nothing_written(out)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path, zoo):
    model = _pickle_model(tmp_path, zoo, lambda p: torch.save([torch.ones(2)], p))
    res, out = merge_pickle(tmp_path, model, zoo)
    assert_one_error(res, "pytorch_model.bin: not a PyTorch state dict")
    assert_nothing_written(out)


def test_legacy_format_pickle_still_loads(tmp_path, zoo):
    state = load_dir(zoo["a"])
    model = _pickle_model(
        tmp_path, zoo, lambda p: torch.save(state, p, _use_new_zipfile_serialization=False)
    )
    res, out = merge_pickle(tmp_path, model, zoo)
    assert res.exit_code == 0, res.output
    got, tb = load_dir(out), load_dir(zoo["b"])
    for name, t in got.items():
        torch.testing.assert_close(t, (state[name] + tb[name]) / 2)


# =============================================================================== patches


def test_truncated_patch_safetensors_says_truncated(tmp_path, zoo, patch_dir):
    patch = copy_model(patch_dir, tmp_path / "p")
    weights = patch / "patch.safetensors"
    os.truncate(weights, weights.stat().st_size - 16)
    out = tmp_path / "out"
    assert_one_error(patch_apply(patch, zoo["base"], out), "patch.safetensors: truncated")
    assert_nothing_written(out)
    res = mmath("patch", "info", patch)
    assert_one_error(res, "patch.safetensors: truncated")
