"""YAML recipes and `maverick-quant run`: validation on load (with hypothesis feeding mangled
recipes), the whole pipeline into one directory, the lock file, and the gates' exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maverick_quant.bundle import Bundle
from maverick_quant.checkpoint import Checkpoint
from maverick_quant.cli import cli
from maverick_quant.errors import InputError
from maverick_quant.recipe_file import Recipe, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
VALID = {
    "model": "model-dir",
    "calibration": {"data": "self", "samples": 4, "seq_len": 24},
    "quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": False, "moe": {"policy": "routed"}},
    "exports": [{"format": "gptq"}, {"format": "compressed-tensors"}],
    "validation": {"data": "eval.txt", "ctx": 24, "max_windows": 2, "gates": ["ppl_ratio<=1.5"]},
}


def test_shipped_recipes_load() -> None:
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert {p.name for p in recipes} >= {"smollm2-demo.yaml", "maverick-gptq-w4g128.yaml", "maverick-q4_0-gguf.yaml",
                                          "maverick-q4_k-gguf.yaml"}
    for path in recipes:
        assert isinstance(load_recipe(path), Recipe), path


@pytest.mark.parametrize("change,message", [
    ({"quantize": {"bits": 9}}, "quantize.bits=9: expected an integer from 2 to 8"),
    ({"quantize": {"group_size": 48}}, "quantize.group_size=48: expected one of"),
    ({"quantize": {"moe": {"polcy": "routed"}}}, "quantize.moe.polcy: unknown key; expected one of policy"),
    ({"quantize": {"method": "gptqq"}}, "quantize.method='gptqq': expected one of rtn, gptq, awq, awq+gptq"),
    ({"calibration": {"samples": "many"}}, "calibration.samples='many': expected int"),
    ({"calibration": {"windows": "sliding"}}, "calibration.windows='sliding': expected one of random, disjoint"),
    ({"exports": [{"format": "onnx"}]}, "exports[].format='onnx': expected one of gptq, awq"),
    ({"exports": [{"format": "gguf", "gguf_type": "Q4_0"}]},
     "gguf_type Q4_0 cannot store the bundle's grid losslessly (Q4_0 stores a 4-bit symmetric grid"),
    ({"exports": [{"format": "gptq", "gguf_pre": "llama3"}]}, "exports[].gguf_pre: a pre-tokenizer name is for a gguf"),
    ({"exports": [{"format": "gptq", "mmproj": "F16"}]}, "exports[].mmproj: only a gguf export writes"),
    ({"exports": [{"format": "gguf", "mmproj": "Q4_0"}]}, "exports[].mmproj='Q4_0': expected one of F16, F32, Q8_0"),
    ({"quantize": {"gguf_grid": "Q4_K"}}, "format gptq cannot store quantize.gguf_grid Q4_K's offset grid"),
    ({"quantize": {"bits": 3}}, "format gptq stores bits (2, 4, 8), quantize.bits is 3"),
    ({"validation": {"data": "x", "gates": ["ppl_ratio<<1"]}}, "gate 'ppl_ratio<<1'"),
    ({"exprots": []}, "exprots: unknown key; expected one of model, calibration"),
    ({"quantize": {"device": "gpu"}}, "quantize.device='gpu': expected auto, cpu, cuda or cuda:N"),
    ({"quantize": {"moe": {"require_full_rank": "yes"}}}, "quantize.moe.require_full_rank='yes': expected bool"),
    ({"validation": {"data": "x", "candidates": ["model-q4_0.gguf"]}},
     "validation.candidates[]='model-q4_0.gguf': expected one of bundle, model-gptq, model-compressed-tensors"),
    ({"validation": {"data": "x", "candidates": []}}, "validation.candidates: empty"),
    ({"validation": {"data": "x", "candidates": ["bundle", "bundle"]}}, "validation.candidates[]: bundle appears twice"),
    ({"exports": [{"format": "gptq"}, {"format": "gptq", "max_shard_size": 10**9}]}, "exports[]: model-gptq appears twice"),
    ({"exports": [{"format": "gptq", "requantize": True}]}, "exports[].requantize: only a gguf export re-quantizes"),
    ({"quantize": {"gguf_grid": "Q4_0", "bits": 8}}, "quantize.bits=8: quantize.gguf_grid Q4_0 sets bits to 4"),
    ({"quantize": {"gguf_grid": "Q4_0", "sym": False}}, "quantize.sym=False: quantize.gguf_grid Q4_0 sets sym to True"),
    ({"validation": {"data": "x", "ctx": 2, "protocol": "llama.cpp"}}, "validation.ctx 2 with protocol llama.cpp: no token of a window is scored"),
    ({"calibration": {"seed": 2**64}}, "seed=18446744073709551616: expected an integer in [0, 2^63)"),
    ({"exports": [{"format": "gptq", "gguf_type": "Q4_K"}]}, "exports[].gguf_type=Q4_K: only a gguf export has a type"),
    ({"exports": [{"format": "gguf", "gguf_type": "Q4_K", "max_shard_size": 10**9}]}, "a gguf export is written as one file"),
    ({"validation": {"data": "x", "hellaswag_tasks": 10}}, "validation.hellaswag_tasks: given without validation.hellaswag or validation.choices"),
    ({"validation": {"data": "x", "kernels": "reference", "candidates": ["model-gptq"]}}, "bundle is not among"),
    ({"exports": 0}, "exports: expected a list"),
    ({"calibration": []}, "calibration: expected a mapping, got list"),
    ({"validation": {"data": "x", "choices_pass_mib": 100}}, "validation.choices_pass_mib: given without"),
    ({"validation": {"data": " "}}, "validation.data: empty; expected a file path"),
    ({"calibration": {"data": ""}}, "calibration.data='': expected a file path or 'self'"),
    ({"quantize": {"moe": {"policy": "mixed", "mix": float("inf")}}}, "moe.mix=inf: expected a positive, finite weight"),
    ({"calibration": {"samples": 10**20}}, "samples=100000000000000000000: expected from 1 to 2,147,483,647"),
    ({"quantize": {"bits_overrides": ["mlp=" + "9" * 4400]}}, "expected REGEX=BITS"),
    # settings the method never reads (each was ignored without a word)
    ({"quantize": {"method": "rtn"}}, "calibration: method rtn rounds each weight to nearest without calibration data"),
    ({"quantize": {"awq": {"grid": 10}}}, "quantize.awq.grid: method gptq does not read it"),
    ({"quantize": {"method": "awq", "act_order": True, "damp": 0.1}},
     "quantize.act_order, quantize.damp: method awq does not read them, so the run would ignore them"),
    ({"quantize": {"method": "awq", "moe": {"all_tokens": 100}}}, "quantize.moe.all_tokens: method awq does not read it"),
])
def test_bad_recipes_name_the_key_and_the_allowed_values(change: dict, message: str) -> None:
    data = json.loads(json.dumps(VALID))
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    with pytest.raises(InputError) as error:
        parse_recipe(data)
    assert message in str(error.value)


def _mangled(draw_value):
    """VALID with one key at any depth replaced, removed, or joined by an unknown key."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append(path + (key,))
                walk(value, path + (key,))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                paths.append(path + (index,))
                walk(value, path + (index,))

    walk(VALID, ())
    return st.tuples(st.sampled_from(paths), st.sampled_from(["replace", "remove", "add"]), draw_value)


ANY_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                         max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mangled(ANY_VALUE))
def test_mangled_recipes_give_a_clean_error_never_a_traceback(mutation) -> None:
    path, action, value = mutation
    data = json.loads(json.dumps(VALID))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "remove":
        parent.pop(last) if isinstance(parent, dict) else parent.pop(last)
    elif isinstance(parent, dict):
        parent["zz_unknown"] = value
    else:
        parent.append(value)
    try:
        parse_recipe(data)
    except InputError as error:
        assert str(error)


def test_require_full_rank_reaches_the_spec_and_enters_the_identity_only_when_set() -> None:
    """An unset flag leaves the recorded spec as it was before the key existed (runs made
    then keep their identity and can be resumed); a set one is recorded and read back."""
    from maverick_quant.recipe import QuantizeSpec

    data = json.loads(json.dumps(VALID))
    assert "require_full_rank" not in parse_recipe(data).quantize.to_dict()["moe"]
    data["quantize"]["moe"]["require_full_rank"] = True
    spec = parse_recipe(data).quantize
    assert spec.moe.require_full_rank and spec.to_dict()["moe"]["require_full_rank"] is True
    assert QuantizeSpec.from_dict(spec.to_dict()) == spec


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_recipe_files_that_are_not_yaml_mappings_exit_2(tmp_path_factory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(path.parent / "out")])
    assert result.exit_code == 2, result.output
    assert not (path.parent / "out").exists()


def _write_recipe(tmp_path: Path, model_dir: Path, text_file: Path, gates: list[str]) -> Path:
    recipe = json.loads(json.dumps(VALID))
    recipe["model"] = str(model_dir)
    recipe["calibration"]["data"] = str(text_file)
    recipe["validation"].update(data=str(text_file), gates=gates)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_makes_bundle_exports_report_and_lock_and_gates_the_exit_code(tiny_llama_dir: Path, small_text_file: Path,
                                                                         tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path, tiny_llama_dir, small_text_file, ["top1_agreement>=0.0"])
    with_export = yaml.safe_load(recipe.read_text())
    with_export["validation"]["candidates"] = ["bundle", "model-gptq"]  # the export users publish is validated too
    recipe.write_text(yaml.safe_dump(with_export))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"calibration", "bundle", "model-gptq", "model-compressed-tensors", "report",
                                               "report-model-gptq", "recipe.lock.yaml"}
    exported = json.loads((out / "report-model-gptq" / "report.json").read_text())
    assert exported["candidate_model"] == str(out / "model-gptq") and exported["gates"]
    lock = yaml.safe_load((out / "recipe.lock.yaml").read_text())
    assert {key: lock["quantize"][key] for key in ("bits", "group_size", "sym", "act_order", "damp", "block_size")} == {
        "bits": 4, "group_size": 32, "sym": False, "act_order": False, "damp": 0.01, "block_size": 128}
    assert lock["quantize"]["moe"]["min_tokens"] == 128  # defaults resolved
    provenance = lock["lock"]
    assert len(provenance["model_fingerprint"]) == 64 and len(provenance["calibration_data_sha256"]) == 64
    assert len(provenance["validation_sha256"]["data"]) == 64 and provenance["versions"]["torch"]
    assert lock["quantize"]["device"] == "auto"  # as written: the lock runs on a machine without this one's GPU
    assert provenance["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # auto, resolved
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["candidate_model"] == str(out / "bundle")
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["recipe"]["weights"]["group_size"] == 32 and manifest["recipe"]["method"] == "gptq"

    again = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and "--force" in again.output
    stamp = (out / "bundle" / "manifest.json").stat().st_mtime_ns
    resumed = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", "--resume"])
    assert resumed.exit_code == 0 and "kept" in resumed.output, resumed.output
    assert (out / "bundle" / "manifest.json").stat().st_mtime_ns == stamp
    other_calibration = yaml.safe_load(recipe.read_text())
    other_calibration["calibration"]["seed"] = 1  # other windows: the finished bundle is not this recipe's
    recipe.write_text(yaml.safe_dump(other_calibration))
    resumed = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", "--resume"])
    assert resumed.exit_code == 2 and "made with other inputs" in resumed.output and "--force" in resumed.output
    assert (out / "bundle" / "manifest.json").stat().st_mtime_ns == stamp  # as the CLI: not replaced without --force
    resumed = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--no-progress", "--resume", "--force"])
    assert resumed.exit_code == 0 and "kept" not in resumed.output, resumed.output
    assert (out / "bundle" / "manifest.json").stat().st_mtime_ns != stamp

    failing = _write_recipe(tmp_path, tiny_llama_dir, small_text_file, ["top1_agreement>=1.01"])
    result = CliRunner().invoke(cli, ["run", str(failing), "--out", str(tmp_path / "run2"), "--no-progress"])
    assert result.exit_code == 1 and "FAILED" in result.output


def test_run_refuses_missing_files_before_any_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path, tiny_llama_dir, tmp_path / "missing.txt", [])
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "calibration.data" in result.output and "missing.txt" in result.output
    assert not (tmp_path / "run").exists()


def test_a_lock_file_runs_again_to_the_same_bundle_and_refuses_changed_inputs(tiny_llama_dir: Path, small_text_file: Path,
                                                                            tmp_path: Path) -> None:
    """recipe.lock.yaml is a recipe: run again it makes the same tensors, bit for bit. Its
    `lock:` section stops a run on another model (before any work) or on other calibration
    windows (before quantizing), and no output directory is left behind."""
    recipe = _write_recipe(tmp_path, tiny_llama_dir, small_text_file, [])
    lock_data = yaml.safe_load(recipe.read_text())
    lock_data["exports"], lock_data["validation"] = [], None
    recipe.write_text(yaml.safe_dump(lock_data))
    first = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "first"), "--no-progress"])
    assert first.exit_code == 0, first.output
    lock_file = tmp_path / "first" / "recipe.lock.yaml"
    again = CliRunner().invoke(cli, ["run", str(lock_file), "--out", str(tmp_path / "again"), "--no-progress"])
    assert again.exit_code == 0, again.output
    hashes = lambda run: {name: f["sha256"] for name, f in json.loads(  # noqa: E731
        (tmp_path / run / "bundle" / "manifest.json").read_text())["files"].items() if name.endswith(".safetensors")}
    assert hashes("again") == hashes("first") and len(hashes("first")) >= 3  # the layers' JSON holds timings

    for key, step in (("model_fingerprint", "before any work"), ("calibration_windows_sha256", "after calibrating")):
        changed = yaml.safe_load(lock_file.read_text())
        changed["lock"][key] = "0" * 64
        path = tmp_path / f"changed-{key}.yaml"
        path.write_text(yaml.safe_dump(changed))
        result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / key), "--no-progress"])
        assert result.exit_code == 2 and f"lock.{key}" in result.output and "0" * 64 in result.output, (step, result.output)
        assert not (tmp_path / key).exists(), step
    older = yaml.safe_load(lock_file.read_text())  # the windows changed, and so did the tool that drew them
    older["lock"]["calibration_windows_sha256"], older["lock"]["versions"]["maverick-quant"] = "0" * 64, "0.0.1"
    (tmp_path / "older.yaml").write_text(yaml.safe_dump(older))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "older.yaml"), "--out", str(tmp_path / "older"), "--no-progress"])
    assert result.exit_code == 2 and "which wrote no lock of it (0.0.1 did), reads or draws them otherwise" in result.output
    legacy = yaml.safe_load(lock_file.read_text())  # a lock whose fingerprint hashed headers only
    legacy["lock"]["model_fingerprint"] = Checkpoint(tiny_llama_dir).fingerprint(sample_bytes=0)
    (tmp_path / "legacy.yaml").write_text(yaml.safe_dump(legacy))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "legacy.yaml"), "--out", str(tmp_path / "legacy")])
    assert result.exit_code == 2 and "written before 2026-12-07" in result.output, result.output
    assert Checkpoint(tiny_llama_dir).fingerprint() in result.output
    bad = yaml.safe_load(lock_file.read_text())
    bad["lock"]["fingerprint"] = "x"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "lock.fingerprint: unknown key" in result.output


@pytest.mark.parametrize("shipped", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_recipe_written_out_resolved_reads_back_as_itself(shipped: Path) -> None:
    """What the lock file is made of: `to_dict` through YAML and `parse_recipe` again is the
    same recipe, gguf grids, MoE policies, AWQ and clip-search settings included."""
    recipe = load_recipe(shipped)
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe.to_dict())), shipped.parent) == recipe


def test_a_lock_lists_only_the_settings_its_method_reads_and_reads_back_as_itself() -> None:
    """An rtn recipe's lock has no calibration section, GPTQ or AWQ keys, nor expert policies
    (rtn reads none: given, they are refused); a gptq one no `awq:` section; awq+gptq all."""
    for method, absent in (("rtn", ("damp", "act_order", "true_sequential", "batch_windows", "awq")),
                           ("gptq", ("awq",)), ("awq", ("damp", "act_order", "block_size"))):
        data = {"model": "m", "quantize": {"method": method}, **({} if method == "rtn" else {"calibration": {"data": "self"}})}
        recipe = parse_recipe(data)
        written = recipe.to_dict()
        assert ("calibration" in written) is (method != "rtn")
        assert not set(absent) & set(written["quantize"]), (method, written["quantize"])
        assert parse_recipe(yaml.safe_load(yaml.safe_dump(written))) == recipe
    assert set(parse_recipe({"model": "m", "calibration": {"data": "self"},
                             "quantize": {"method": "awq+gptq"}}).to_dict()["quantize"]) >= {"damp", "awq"}
    assert parse_recipe({"model": "m", "quantize": {"method": "rtn"}}).to_dict()["quantize"]["moe"] == \
        {"quantize_router": False, "chunk_mib": 8192}
    # a lock written before 0.3.0 listed every key for every method: it still runs as a recipe
    old_lock = {"model": "m", "calibration": {"data": None, "samples": 128}, "lock": {"device": "cpu"},
                "quantize": {"method": "rtn", "damp": 0.01, "awq": {"grid": 20}, "moe": {"policy": "routed"}}}
    assert parse_recipe(old_lock).quantize.method.value == "rtn"
    assert parse_recipe({"model": "m", "calibration": {"data": None}, "quantize": {"method": "rtn"}})  # nothing set


def test_a_gguf_export_of_any_grid_it_stores_losslessly_is_accepted() -> None:
    """As `export --format gguf`: Q4_0 stores a symmetric 4-bit grid of any group multiple of 32."""
    data = json.loads(json.dumps(VALID))
    data["quantize"] = {**data["quantize"], "sym": True, "group_size": 128}
    data["exports"] = [{"format": "gguf", "gguf_type": "Q4_0", "gguf_pre": "smollm"}]
    assert parse_recipe(data).exports[0].gguf_pre == "smollm"


@pytest.mark.parametrize("validation, message", [
    ({"gates": ["ppl_ratio<=baseline*1.01"]}, "no baseline report was given"),
    ({"kernels": "cuda"}, "--kernels cuda runs on cuda"),
    ({"kernels": "reference"}, "validation.kernels reference: model.layers.0.self_attn.q_proj: K=96 is not a multiple "
                               "of the group size 128; validate the bundle without kernels"),
    ({"data": "short.txt"}, "need at least one window of 16"),
    ({"ctx": 100000}, "past the model's max_position_embeddings of 2048"),
    ({"hellaswag": "bad-hellaswag.txt"}, "is not a multiple of 6"),
])
def test_what_the_validation_step_would_refuse_is_refused_before_any_work(tiny_llama_dir: Path, small_text_file: Path,
                                                                          tmp_path: Path, validation: dict,
                                                                          message: str) -> None:
    (tmp_path / "bad-hellaswag.txt").write_text("context\n0\nending\n")
    (tmp_path / "short.txt").write_text("a few words")
    recipe = tmp_path / "recipe.yaml"
    validation = {"data": str(small_text_file), "ctx": 16, "max_windows": 2, **validation}
    for key in ("hellaswag", "data"):
        validation[key] = str(tmp_path / validation[key]) if key in validation else None
    validation = {key: value for key, value in validation.items() if value is not None}
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn"},
                                      "validation": validation}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_kernels_this_machine_cannot_run_are_refused_before_any_work(tiny_llama_dir: Path, small_text_file: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """`validation.kernels: cpu-int4` where torch lacks the int4 op (as `cuda` without nvcc) was
    found at the validation step, after the whole quantize: now before any work."""
    from maverick_quant.compress.kernels import backends

    monkeypatch.setattr(backends, "cpu_int4_available", lambda: False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "group_size": 32},
                                      "validation": {"data": str(small_text_file), "ctx": 16, "max_windows": 2,
                                                     "kernels": "cpu-int4"}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "kernel backend cpu-int4 needs the CPU and torch's _weight_int4pack_mm_for_cpu op" in result.output
    assert "missing in this torch build" in result.output and not (tmp_path / "run").exists()


def test_a_key_given_twice_is_refused_naming_its_lines(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: a second `gates:` silently dropped the first list,
    and the run passed on the looser gates."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: m\nvalidation:\n  data: a.txt\n  gates: ['ppl_ratio<=1.0001']\n  batch: 2\n"
                      "  gates: ['ppl_ratio<=100']\n")
    with pytest.raises(InputError, match=r"recipe.yaml: line 6: key 'gates' is given twice in one mapping \(first on line 4\)"):
        load_recipe(recipe)
    merged = tmp_path / "merged.yaml"  # a YAML merge key is no repeated key
    merged.write_text("model: m\nexports:\n  - &packed {format: gptq, max_shard_size: 1000000}\n"
                      "  - {<<: *packed, format: compressed-tensors}\nquantize: {method: rtn}\n")
    exports = load_recipe(merged).exports
    assert [(step.format, step.max_shard_size) for step in exports] == [("gptq", 10**6), ("compressed-tensors", 10**6)]


def test_resume_refuses_a_folder_that_holds_no_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`run --resume` on a folder holding no run replaced its report/ and calibration/ without --force."""
    out = tmp_path / "mine"
    (out / "report").mkdir(parents=True)
    (out / "report" / "notes.txt").write_text("mine")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "group_size": 32}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--resume", "--no-progress"])
    assert result.exit_code == 2 and "the folder holds no earlier run" in result.output, result.output
    assert (out / "report" / "notes.txt").read_text() == "mine" and not (out / "bundle").exists()
    fresh = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "new"), "--resume", "--no-progress"])
    assert fresh.exit_code == 0, fresh.output  # a folder not there yet: nothing to replace
    again = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "new"), "--resume", "--no-progress"])
    assert again.exit_code == 0, again.output  # the run it left


def test_a_run_never_replaces_one_of_its_inputs(tiny_llama_dir: Path, small_text_file: Path, tmp_path: Path) -> None:
    """A run replaces its steps' folders inside --out (bundle, exports, reports): a model that is
    one of them is refused before any work; a model elsewhere under --out is left alone."""
    import shutil

    model = tmp_path / "run" / "bundle"
    shutil.copytree(tiny_llama_dir, model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model), "quantize": {"method": "rtn", "group_size": 32}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run"), "--resume", "--force"])
    assert result.exit_code == 2 and "the input model" in result.output, result.output
    assert (model / "config.json").is_file() and not (tmp_path / "run" / "calibration").exists()
    shutil.move(str(model), str(tmp_path / "run" / "source"))
    recipe.write_text(yaml.safe_dump({"model": str(tmp_path / "run" / "source"),
                                      "quantize": {"method": "rtn", "group_size": 32}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run"), "--resume", "--no-progress",
                                      "--force"])  # the folder holds no run: --resume alone is refused
    assert result.exit_code == 0 and (tmp_path / "run" / "bundle" / "manifest.json").is_file(), result.output
    assert (tmp_path / "run" / "source" / "config.json").is_file()


def test_a_run_dir_never_holds_a_stale_lock_nor_is_it_the_model_or_a_file(tiny_llama_dir: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """A forced run that fails midway leaves no lock of the earlier recipe beside its new bundle,
    and names what the earlier run made that this one does not; --out cannot be the model
    folder, nor an existing file (it was a FileExistsError traceback under --force)."""
    import maverick_quant.recipe_run as recipe_run

    def recipe(**extra) -> Path:
        path = tmp_path / f"recipe-{len(extra)}.yaml"
        path.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "group_size": 32},
                                        **extra}))
        return path

    run_dir = tmp_path / "run"
    first = CliRunner().invoke(cli, ["run", str(recipe(exports=[{"format": "gptq"}])), "--out", str(run_dir), "--no-progress"])
    assert first.exit_code == 0 and (run_dir / "recipe.lock.yaml").is_file(), first.output

    def failing_export(*args, **kwargs):
        raise InputError("export refused")

    monkeypatch.setattr(recipe_run, "run_export", failing_export)
    second = CliRunner().invoke(cli, ["run", str(recipe(exports=[{"format": "compressed-tensors"}], calibration={})),
                                      "--out", str(run_dir), "--force", "--no-progress"])
    assert second.exit_code == 2 and "export refused" in second.output, second.output
    assert not (run_dir / "recipe.lock.yaml").exists() and (run_dir / "bundle" / "manifest.json").is_file()
    assert f"note: {run_dir} also holds model-gptq, which this recipe does not make" in second.output
    monkeypatch.undo()
    gguf = recipe(exports=[{"format": "gptq"}, {"format": "gguf", "gguf_type": "Q4_0", "requantize": True}])
    for _ in range(2):  # the second finds only its own outputs (a GGUF's card and manifest included): no note
        again = CliRunner().invoke(cli, ["run", str(gguf), "--out", str(run_dir), "--force", "--no-progress"])
        assert again.exit_code == 0, again.output
    assert "also holds" not in again.output, again.output
    lock = run_dir / "recipe.lock.yaml"
    rerun = CliRunner().invoke(cli, ["run", str(lock), "--out", str(run_dir), "--force", "--no-progress"])
    assert rerun.exit_code == 0 and lock.is_file(), rerun.output  # the lock run from its own folder is not removed
    for out, message in ((tiny_llama_dir, "the model folder itself"), (tmp_path / "recipe-0.yaml", "a file")):
        result = CliRunner().invoke(cli, ["run", str(recipe()), "--out", str(out), "--force"])
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_refused_resume_leaves_the_calibration_of_the_run_it_refused(tiny_llama_dir: Path, small_text_file: Path,
                                                                       tmp_path: Path) -> None:
    """A run killed while quantizing, resumed with another seed, is refused before anything is
    written: the calibration set is saved only once the bundle stands on it."""
    import os
    import subprocess
    import sys

    from maverick_quant.outputs import KILL_DURING_WRITE

    def recipe(seed: int) -> Path:
        path = tmp_path / f"recipe-{seed}.yaml"
        path.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "gptq", "group_size": 32},
                                        "calibration": {"data": str(small_text_file), "samples": 2, "seq_len": 16,
                                                        "seed": seed}}))
        return path

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), KILL_DURING_WRITE: "2"}
    killed = subprocess.run([sys.executable, "-m", "maverick_quant", "run", str(recipe(0)), "--out", str(run_dir),
                             "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    result = CliRunner().invoke(cli, ["run", str(recipe(7)), "--out", str(run_dir), "--resume", "--no-progress"])
    assert result.exit_code == 2 and "different inputs" in result.output, result.output
    assert not (run_dir / "calibration").exists()
    result = CliRunner().invoke(cli, ["run", str(recipe(0)), "--out", str(run_dir), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "calibration" / "calib.json").read_text())["seed"] == 0


def test_a_gguf_export_llama_cpp_cannot_run_is_refused_before_any_work(tiny_llama4_dir: Path, tmp_path: Path) -> None:
    """The tiny Llama 4's 16-token attention chunks are not llama.cpp's fixed 8192: the export
    step would refuse it after quantizing; the recipe refuses it first."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama4_dir), "quantize": {"method": "rtn", "gguf_grid": "Q4_0"},
                                      "exports": [{"format": "gguf", "gguf_type": "Q4_0"}]}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "llama.cpp's llama4 cannot represent this model" in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_a_packed_moe_export_vllm_cannot_run_is_refused_before_any_work(tiny_llama4_dir: Path, tiny_llama_dir: Path,
                                                                      tmp_path: Path) -> None:
    """An asymmetric grid on a Llama 4 cannot go to compressed-tensors (vLLM's MoE kernel is
    symmetric only): refused before quantizing, while the same recipe on a dense Llama runs."""
    for model, code in ((tiny_llama4_dir, 2), (tiny_llama_dir, 0)):
        recipe = tmp_path / f"{model.name}.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(model), "quantize": {"method": "rtn", "sym": False, "group_size": 32},
                                          "exports": [{"format": "compressed-tensors"}]}))
        result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / model.name), "--device", "cpu",
                                          "--no-progress"])
        assert result.exit_code == code, result.output
        if code == 2:
            assert "exports: format compressed-tensors" in result.output and "symmetric" in result.output, result.output
            assert not (tmp_path / model.name).exists()


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_groups_that_do_not_tile_k_are_refused_before_any_work_for_layouts_that_need_them(
        tiny_llama4_dir: Path, tmp_path: Path, fmt: str) -> None:
    """The tiny Llama 4's dense MLP down has K=48: group 32 cannot tile it, which AWQ GEMM and
    compressed-tensors need. The run used to quantize first and fail at the export step; gptq
    (a shorter last group, g_idx) takes it."""
    outputs = {}
    for export, code in ((fmt, 2), ("gptq", 0)):
        recipe = tmp_path / f"{export}.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(tiny_llama4_dir), "quantize": {"method": "rtn", "group_size": 32},
                                          "exports": [{"format": export}]}))
        result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / export), "--no-progress"])
        assert result.exit_code == code, result.output
        outputs[export] = result.output
    assert (f"exports: format {fmt} needs K a multiple of the group size, and 2 linears have another K: "
            "language_model.model.layers.0.feed_forward.down_proj (K=48)") in outputs[fmt], outputs[fmt]
    assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("case", ["fused-split", "expert-override", "no-llama-cpp"])
def test_what_a_later_step_refuses_about_the_overrides_or_clients_is_refused_before_any_work(
        case: str, tiny_llama_dir: Path, tiny_llama4_dir: Path, small_text_file: Path, tmp_path: Path, monkeypatch) -> None:
    """Each of these used to fail only after quantizing (and calibrating): a keep_float that
    splits q/k/v, which vLLM fuses, before a gptq export; a keep_float matching routed experts;
    a GGUF candidate with no llama-cpp-python to run it."""
    import sys

    recipe = {"model": str(tiny_llama_dir), "calibration": {"data": str(small_text_file), "samples": 2, "seq_len": 16},
              "quantize": {"method": "gptq", "group_size": 32}}
    if case == "fused-split":
        recipe.update(exports=[{"format": "gptq"}])
        recipe["quantize"]["keep_float"] = ["q_proj"]
        message = "vLLM fuses q_proj/k_proj/v_proj"
    elif case == "expert-override":
        recipe["model"] = str(tiny_llama4_dir)
        recipe["quantize"]["keep_float"] = ["experts"]
        message = "keep_float matches the routed experts"
    else:
        monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
        recipe["quantize"].update(gguf_grid="Q4_0", method="rtn")
        del recipe["calibration"]  # rtn reads none
        recipe.update(exports=[{"format": "gguf", "gguf_type": "Q4_0"}],
                      validation={"data": str(small_text_file), "ctx": 16, "candidates": ["model-q4_0.gguf"]})
        message = "install llama-cpp-python"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"), "--device",
                                      "cpu", "--no-progress"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_self_validation_data_too_large_for_memory_is_refused_before_any_work(tiny_llama_dir: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    """`validation.data: self` is generated only after quantizing and exporting; a model whose
    fp32 weights exceed the available memory (made so here) is refused before calibrating."""
    from maverick_quant import host_memory

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 1024)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn"},
                                      "validation": {"data": "self"}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "whole model loaded in fp32" in result.output and str(tiny_llama_dir) in result.output
    assert not (tmp_path / "run").exists()


def test_the_maverick_gptq_recipe_keeps_float_exactly_what_its_exports_write_float() -> None:
    """The shipped Maverick GPTQ recipe: W4 g128 symmetric with Q4_0's scale rule and the clip
    search, and its keep_float regex matches exactly the linears the packed exports write as
    float for vLLM (the rope layers' q/k/v: `LayerPlan.float_in_packed_exports`), no NoPE layer."""
    from maverick_quant.arch.llama4 import LLAMA4, maverick_config

    recipe = load_recipe(REPO / "recipes" / "maverick-gptq-w4g128.yaml")
    weights = recipe.quantize.weights
    assert (weights.bits, weights.group_size, weights.sym, weights.signed_scale, weights.clip_search) == (4, 128, True, True, True)
    text = LLAMA4.text_config(maverick_config())
    kept = 0
    for index in range(text.num_hidden_layers):
        plan = LLAMA4.plan(text, index)
        for linear in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"self_attn.{linear}"
            expected = name in plan.float_in_packed_exports
            assert recipe.quantize.keeps_float(LLAMA4.prefix(index) + name) == expected, (index, name)
            kept += expected
    assert kept == 36 * 3 and text.no_rope_layers[3] == 0  # 36 rope layers, NoPE every 4th


@pytest.mark.parametrize("shipped", sorted((REPO / "recipes").glob("smollm2-*.yaml")), ids=lambda path: path.name)
def test_shipped_smollm2_recipes_pass_every_check_made_before_work(shipped: Path, smollm2_dir: Path) -> None:
    """The demo recipe was refused before any work: its `data: self` validation was checked as
    one without text (its ppl_ratio gate 'never held'), and its compressed-tensors export cannot
    tile SmolLM2's 576-wide inputs with group 128. Every check `run` makes first must pass."""
    from maverick_quant.jobs import _recipe_model_dir
    from maverick_quant.recipe_run import _check_before_work
    from maverick_quant.streaming import open_source

    recipe = load_recipe(shipped)
    if recipe.calibration_data not in (None, "self") and not Path(recipe.calibration_data).is_file():
        pytest.skip(f"{recipe.calibration_data} is not here (../shared/data)")
    model_dir = _recipe_model_dir(recipe.model)
    _check_before_work(recipe, model_dir, open_source(model_dir), "cpu")


def test_a_self_text_validation_compares_its_baseline_before_any_work(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`validation.data: self` is written after quantizing, so the baseline's windows were
    compared only then; its protocol and ctx are known before any work."""
    baseline = tmp_path / "report.json"
    baseline.write_text(json.dumps({"protocol": {"name": "gptq", "ctx": 32, "first_scored_position": 1},
                                    "kl": {"mean": 0.1}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn"},
                                      "validation": {"data": "self", "ctx": 64, "baseline": str(baseline),
                                                     "gates": ["kl.mean<=baseline*1.1"]}}))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2 and "measured with protocol.ctx = 32, this run with 64" in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_a_forced_run_leaves_no_earlier_report_and_names_an_earlier_calibration(tiny_llama_dir: Path,
                                                                               small_text_file: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """After `run --force` failed before its validation, the earlier run's report (gates passed)
    stood beside the new bundle; an rtn recipe over a gptq run kept its calibration/ unnamed."""
    from maverick_quant import recipe_run

    validation = {"data": str(small_text_file), "ctx": 16, "max_windows": 2, "gates": ["ppl_ratio<=100"]}
    gptq = tmp_path / "gptq.yaml"
    gptq.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "calibration": {"data": str(small_text_file),
                                    "samples": 2, "seq_len": 16}, "quantize": {"method": "gptq", "group_size": 32},
                                    "validation": validation}))
    out = tmp_path / "run"
    first = CliRunner().invoke(cli, ["run", str(gptq), "--out", str(out), "--no-progress"])
    assert first.exit_code == 0 and (out / "report" / "report.json").is_file(), first.output
    rtn = tmp_path / "rtn.yaml"
    rtn.write_text(yaml.safe_dump({"model": str(tiny_llama_dir), "quantize": {"method": "rtn", "group_size": 32},
                                   "validation": validation}))

    def fails(*args, **kwargs):
        raise InputError("the validation step failed")

    monkeypatch.setattr(recipe_run, "run_validate", fails)
    second = CliRunner().invoke(cli, ["run", str(rtn), "--out", str(out), "--force", "--no-progress"])
    assert second.exit_code == 2 and "the validation step failed" in second.output, second.output
    assert "also holds calibration, which this recipe does not make" in second.output
    assert not (out / "report").exists() and Bundle(out / "bundle").manifest["recipe"]["method"] == "rtn"
