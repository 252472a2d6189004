"""``python -m sstoken_pl evaluate`` as a user runs it: from an exported model, a run dir and a checkpoint."""

import json

import pytest

from sstoken_pl.data import extract_final_answer
from sstoken_pl.evaluation import answers_match
from tests.test_cli import cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = cli("fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
              "--trainer.limit_val_batches=0")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_an_exported_model_a_run_dir_and_a_checkpoint(tiny_run, tmp_path):
    version = tiny_run / "lightning_logs" / "version_0"
    common = ["--config", "configs/tiny.yaml", "--num_problems", "5", "--max_new_tokens", "12", "--batch_size", "3"]
    outputs = {}
    for name, model in [("exported", version / "hf_model"), ("run", tiny_run), ("ckpt", next((version / "checkpoints").glob("*.ckpt")))]:
        dest = tmp_path / f"{name}.jsonl"
        out = cli("evaluate", "--model", str(model), *common, "--output", str(dest))
        assert out.returncode == 0, out.stderr[-3000:]
        assert "exact match: " in out.stdout and "/5 = " in out.stdout
        rows = _rows(dest)
        assert len(rows) == 5 and set(rows[0]) == {"index", "prompt", "output", "gold", "extracted", "correct"}
        assert [r["index"] for r in rows] == list(range(5)), "the first problems of the split, in order"
        for r in rows:
            assert r["extracted"] == extract_final_answer(r["output"])
            assert r["correct"] == answers_match(r["extracted"], r["gold"])
        summary = json.loads((tmp_path / f"{name}.summary.json").read_text())
        assert summary["n"] == 5 and summary["correct"] == sum(r["correct"] for r in rows)
        outputs[name] = [r["output"] for r in rows]
    assert outputs["exported"] == outputs["run"] == outputs["ckpt"], "the same weights generate the same text"
    # without --output the JSONL lands beside the model
    out = cli("evaluate", "--model", str(tiny_run), *common)
    assert out.returncode == 0 and (version / "eval_validation.jsonl").is_file()


def test_evaluate_a_test_split_of_a_data_folder(tiny_run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n' * 4)
    (data / "test.jsonl").write_text('{"question": "2+2?", "answer": "4\\n#### 4"}\n{"question": "3+3?", "answer": "#### 6"}\n')
    dest = tmp_path / "test.jsonl"
    out = cli("evaluate", "--model", str(tiny_run), "--data.path", str(data), "--data.format", "gsm8k", "--split", "test",
              "--num_problems", "10", "--max_new_tokens", "4", "--output", str(dest))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["gold"] for r in _rows(dest)] == ["4", "6"] and _rows(dest)[0]["prompt"] == "2+2?"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "could not load"),
        (["--model", "{tmp}/bad.ckpt"], "not a readable Lightning checkpoint"),
        (["--model", "{tmp}"], "holds no model"),
        (["--model", "{run}", "--split", "test"], "synthetic task has no test split"),
        (["--model", "{run}", "--data.path", "{tmp}/only_train.jsonl", "--split", "test"], "no test split"),
        ([], "give --model"),
        (["--model", "{run}", "--retention", "true", "--general_path", "{tmp}/none.jsonl"], "needs its data"),
        (["--model", "{run}", "--retention", "true", "--retention_samples", "0"], "--retention_samples must be positive"),
    ],
)
def test_bad_input_is_one_line(tiny_run, tmp_path, args, message):
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    (tmp_path / "only_train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    args = [a.format(tmp=tmp_path, run=tiny_run) for a in args]
    out = cli("evaluate", *args, "--num_problems", "1", "--max_new_tokens", "1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and message in out.stderr.strip().splitlines()[-1]
