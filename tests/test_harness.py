"""sstoken_pl.harness: lm-evaluation-harness on an exported model, with a tiny local task (tests/data/lm_eval_task)."""

import json
import os
import sys

import pytest

from sstoken_pl.errors import ConfigError

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lm_eval_task")


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-init tiny Llama and the byte tokenizer, saved as an exported model (``<run>/hf_model``)."""
    from sstoken_pl.models import load_causal_lm, tiny_llama_config
    from sstoken_pl.tokenizer import byte_tokenizer

    path = tmp_path_factory.mktemp("run") / "hf_model"
    load_causal_lm(config=tiny_llama_config(), seed=0).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _write_task(folder, data_files, dataset_path="json", name="sstoken_arith"):
    """The committed task YAML with its data path replaced (datasets reads relative data_files from the cwd)."""
    with open(os.path.join(TASK_DIR, "sstoken_arith.yaml")) as f:
        text = f.read()
    assert "    test: arith.jsonl\n" in text and "dataset_path: json\n" in text and "task: sstoken_arith\n" in text
    text = text.replace("    test: arith.jsonl\n", f"    test: {data_files}\n")
    text = text.replace("dataset_path: json\n", f"dataset_path: {dataset_path}\n").replace(
        "task: sstoken_arith\n", f"task: {name}\n")
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return str(folder)


@pytest.fixture
def task_dir(tmp_path):
    return _write_task(tmp_path / "tasks", os.path.join(TASK_DIR, "arith.jsonl"))


def _items():
    with open(os.path.join(TASK_DIR, "arith.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fixture_is_a_valid_four_choice_task():
    items = _items()
    assert len(items) == 8
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        a, op, b = item["question"].removeprefix("What is ").removesuffix("?").split()
        assert item["choices"][item["label"]] == str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


def test_local_task_result_table_and_delta(lm_eval, model_dir, task_dir, tmp_path, capsys):
    from sstoken_pl.harness import run_cli

    run_dir = os.path.dirname(model_dir)
    # a run directory resolves to its exported hf_model; the default output lands in the run's folder
    base = run_cli(["--model", run_dir, "--tasks", "sstoken_arith", "--include_path", task_dir, "--limit", "8",
                    "--batch_size", "4", "--dtype", "float32"])
    out = os.path.join(run_dir, "lm_eval_results.json")
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(base))
    entry = base["tasks"]["sstoken_arith"]
    assert base["model"] == os.path.abspath(model_dir)
    assert entry["n"] == 8 and entry["num_fewshot"] == 0
    acc = entry["metrics"]["acc"]
    assert 0.0 <= acc["value"] <= 1.0 and abs(acc["value"] * 8 - round(acc["value"] * 8)) < 1e-9  # k of 8 items
    assert acc["stderr"] is not None and acc["stderr"] >= 0 and acc["higher_is_better"] is True
    printed = capsys.readouterr().out
    assert "sstoken_arith" in printed and "acc_norm" in printed and f"{acc['value']:.4f}" in printed

    # 2-shot on 4 items against the first run as the base, through `python -m sstoken_pl evaluate --lm_eval_tasks`
    from sstoken_pl.eval_cli import run

    second = run(["--model", model_dir, "--lm_eval_tasks=sstoken_arith", "--include_path", task_dir, "--limit", "4",
                  "--num_fewshot", "2", "--dtype", "float32", "--base_results", out,
                  "--output", str(tmp_path / "second.json")])
    assert os.path.isfile(tmp_path / "second.json")
    entry2 = second["tasks"]["sstoken_arith"]
    assert entry2["n"] == 4 and entry2["num_fewshot"] == 2
    for metric in ("acc", "acc_norm"):
        m = entry2["metrics"][metric]
        assert m["base"] == entry["metrics"][metric]["value"]
        assert m["delta"] == pytest.approx(m["value"] - m["base"])
    printed = capsys.readouterr().out
    assert "delta" in printed and f"{entry2['metrics']['acc']['delta']:+.4f}" in printed


def test_lm_eval_results_json_as_base():
    from sstoken_pl.harness import add_delta, compact_results, load_results

    raw = {  # the shape of `lm_eval --output_path` results: a group with two tasks, one filtered metric
        "results": {"grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
                    "t1": {"alias": " - t1", "acc,none": 0.25, "acc_stderr,none": 0.1},
                    "t2": {"alias": " - t2", "exact_match,strict": 0.75, "exact_match_stderr,strict": 0.05}},
        "group_subtasks": {"grp": ["t1", "t2"]},
        "n-shot": {"grp": 5, "t1": 5, "t2": 5},
        "n-samples": {"t1": {"original": 10, "effective": 6}, "t2": {"original": 9, "effective": 4}},
        "higher_is_better": {"t1": {"acc": True}},
    }
    tasks = compact_results(raw)
    assert tasks["grp"]["n"] == 10 and tasks["grp"]["subtasks"] == ["t1", "t2"]
    assert tasks["grp"]["metrics"] == {"acc": {"value": 0.5, "stderr": None, "higher_is_better": None}}
    assert tasks["t2"]["metrics"]["exact_match,strict"]["value"] == 0.75 and tasks["t1"]["num_fewshot"] == 5
    result = {"tasks": json.loads(json.dumps(tasks)), "base_results": "x"}
    result["tasks"]["t1"]["metrics"]["acc"]["value"] = 0.4
    assert add_delta(result, {"tasks": tasks}) == 3
    assert result["tasks"]["t1"]["metrics"]["acc"]["delta"] == pytest.approx(0.15)
    assert result["tasks"]["grp"]["metrics"]["acc"]["delta"] == 0.0


def test_base_results_errors(tmp_path):
    from sstoken_pl.harness import load_results

    with pytest.raises(ConfigError, match="--base_results: no such file"):
        load_results(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_results(str(bad))
    bad.write_text('{"x": 1}')
    with pytest.raises(ConfigError, match="neither"):
        load_results(str(bad))


def test_base_results_without_the_task(lm_eval, model_dir, task_dir, tmp_path):
    from sstoken_pl.harness import run_harness

    base = tmp_path / "base.json"
    base.write_text(json.dumps({"model": "m", "tasks": {"other": {"metrics": {"acc": {"value": 0.5}}}}}))
    with pytest.raises(ConfigError, match="has none of the tasks sstoken_arith"):
        run_harness(model_dir, ["sstoken_arith"], include_path=[task_dir], base_results=str(base))


def test_lm_eval_missing(monkeypatch, model_dir):
    from sstoken_pl.harness import run_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[eval\]'"):
        run_harness(model_dir, ["arc_easy"])


def test_model_folder_errors(lm_eval, tmp_path, model_dir):
    from sstoken_pl.harness import run_harness

    with pytest.raises(ConfigError, match="--model: no such folder"):
        run_harness(str(tmp_path / "missing"), ["arc_easy"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        run_harness(str(tmp_path / "empty"), ["arc_easy"])
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    with open(os.path.join(model_dir, "config.json")) as f:
        (no_tok / "config.json").write_text(f.read())
    with pytest.raises(ConfigError, match="has no tokenizer"):
        run_harness(str(no_tok), ["arc_easy"])


@pytest.mark.parametrize("kwargs, match", [
    ({"tasks": []}, "name at least one task"),
    ({"num_fewshot": -1}, "--num_fewshot must be >= 0"),
    ({"limit": 0}, "--limit must be positive"),
    ({"batch_size": "big"}, "--batch_size must be"),
    ({"include_path": ["/nonexistent/sstoken"]}, "--include_path: no such folder"),
])
def test_argument_errors(lm_eval, model_dir, kwargs, match):
    from sstoken_pl.harness import run_harness

    args = {"tasks": ["sstoken_arith"], **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_harness(model_dir, **args)


def test_dataset_load_failures_name_the_task(lm_eval, model_dir, tmp_path, monkeypatch, capsys):
    import datasets

    from sstoken_pl.harness import main

    # the committed template's relative data_files, read from a folder that does not hold it
    folder = _write_task(tmp_path / "rel", "arith.jsonl")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", model_dir, "--tasks", "sstoken_arith", "--include_path", folder])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --tasks: task 'sstoken_arith' could not load its dataset") and "current folder" in err

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("the hub-offline case needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it) before datasets loads")
    hub = _write_task(tmp_path / "hub", "unused.jsonl", dataset_path="sstoken-pl-tests/no-such-dataset", name="hub_task")
    with pytest.raises(SystemExit):
        main(["--model", model_dir, "--tasks", "hub_task", "--include_path", hub])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "task 'hub_task' could not load its dataset" in err
    assert "HF_DATASETS_OFFLINE" in err


def test_paper_tasks_exist_and_unknown_task(lm_eval, model_dir):
    from sstoken_pl.harness import PAPER_TASKS, _task_manager, expand_tasks, run_harness

    index = _task_manager((), True).all_tasks  # lm-eval's built-in tasks (takes seconds, cached)
    for name, spec in PAPER_TASKS.items():
        for task in spec.lm_eval_tasks:
            assert task in index, f"{name}: {task} is not a task of the installed lm-eval"
    plan = dict(expand_tasks(["paper"]))
    assert plan["mmlu"] == 5 and plan["arc_challenge"] == 0 and "tydiqa_goldp" not in plan and len(plan) == 9
    assert dict(expand_tasks(["mmlu", "tydiqa", "x"], num_fewshot=3)) == {"mmlu": 3, "tydiqa_goldp": 3, "x": 3}
    assert dict(expand_tasks(["x"])) == {"x": None}
    with pytest.raises(ConfigError, match=r"unknown task 'arc_esy' \(close: .*arc_easy.*the paper's tasks are paper, mmlu"):
        run_harness(model_dir, ["arc_esy"])
