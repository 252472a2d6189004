"""Retention measures (``sstoken_pl.retention``): the NLL itself, the record, ``fit`` and ``evaluate``."""

import json
import math
import os

import pytest
import torch

from sstoken_pl.errors import ConfigError, DataError
from sstoken_pl.loss import IGNORE_INDEX
from sstoken_pl.retention import (
    SYNTHETIC_SOURCE,
    RetentionConfig,
    encode_pairs,
    mean_nll,
    read_gsm8k,
    read_seed_tasks,
    retention_record,
    sources,
    synthetic_pairs,
    trains_on_gsm8k,
)
from sstoken_pl.synthetic import SyntheticTask
from tests.conftest import SHARED_DATA
from tests.test_cli import cli

SEED_TASKS = [
    {"id": "seed_task_0", "name": "a", "instruction": "Name a colour.", "is_classification": False,
     "instances": [{"input": "", "output": "Blue."}]},
    {"id": "seed_task_1", "name": "b", "instruction": "Add the numbers.", "is_classification": False,
     "instances": [{"input": "2 and 3", "output": "2 + 3 = 5."}, {"input": "  ", "output": "Nothing to add."}]},
    {"id": "seed_task_2", "name": "c", "instruction": "Say hello in French.", "is_classification": False,
     "instances": [{"input": "", "output": "Bonjour, comment allez-vous ?"}]},
]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "Anna has 10 pens and gives 6 away. How many are left?", "answer": "10 - 6 = <<10-6=4>>4\n#### 4"},
    {"question": "A box has 2 rows of 5 cards. How many cards?", "answer": "2 * 5 = 10 cards\n#### 10"},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def data_files(tmp_path):
    return _write(tmp_path / "seed_tasks.jsonl", SEED_TASKS), _write(tmp_path / "test.jsonl", GSM8K)


def test_readers_build_prompts_and_responses(data_files):
    general, other = data_files
    assert read_seed_tasks(general) == [
        ("Name a colour.", "Blue."),
        ("Add the numbers.\n\n2 and 3", "2 + 3 = 5."),
        ("Add the numbers.", "Nothing to add."),  # a blank input adds nothing
        ("Say hello in French.", "Bonjour, comment allez-vous ?"),
    ]
    assert len(read_seed_tasks(general, limit=2)) == 2
    pairs = read_gsm8k(other, limit=2)
    assert pairs == [(GSM8K[0]["question"], "3 + 4 = 7\n#### 7"), (GSM8K[1]["question"], "10 - 6 = 4\n#### 4")]


def test_nll_equals_a_direct_computation(tiny_llama, chat_tok, data_files):
    encoded = encode_pairs(read_seed_tasks(data_files[0]), chat_tok)
    assert len(encoded) == 4
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:  # one unpadded sequence at a time
            logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for i in range(1, len(ids)):
                if labels[i] != IGNORE_INDEX:
                    total -= float(logp[i - 1, labels[i]])
                    count += 1
    tiny_llama.train()
    value, tokens = mean_nll(tiny_llama, encoded, chat_tok.pad_token_id, batch_size=3)  # padded batches
    assert tokens == count and count > 20
    assert math.isclose(value, total / count, rel_tol=1e-5)
    assert tiny_llama.training, "the model's mode is restored"


def test_record_of_an_untouched_model_has_zero_delta(tiny_llama, chat_tok, data_files):
    config = RetentionConfig(enabled=True, general_path=data_files[0], other_path=data_files[1], batch_size=2)
    base = retention_record(tiny_llama, chat_tok, config)
    assert base["general_nll"]["base"] is None and base["general_nll"]["delta"] is None
    again = retention_record(tiny_llama, chat_tok, config, base=base)
    for name in ("general_nll", "other_nll"):
        entry = again[name]
        assert entry["base"] == base[name]["after"] and entry["tokens"] > 0
        assert entry["delta"] == pytest.approx(0.0, abs=1e-9)
        assert set(entry) == {"base", "after", "delta", "tokens", "path"}
    assert again["other_nll"]["path"] == data_files[1]
    # plain numbers work as a base too
    shifted = retention_record(tiny_llama, chat_tok, config, base={"general_nll": 1.0})
    assert shifted["general_nll"]["delta"] == pytest.approx(shifted["general_nll"]["after"] - 1.0)
    assert shifted["other_nll"]["delta"] is None


def test_missing_data_is_skipped_or_refused(tiny_llama, chat_tok, tmp_path, data_files):
    config = RetentionConfig(enabled=True, general_path=str(tmp_path / "absent.jsonl"), other_path=data_files[1])
    record = retention_record(tiny_llama, chat_tok, config)
    assert "absent.jsonl" in record["general_nll"]["skipped"] and "general_path" in record["general_nll"]["skipped"]
    assert record["other_nll"]["tokens"] > 0
    with pytest.raises(ConfigError, match="absent.jsonl"):
        retention_record(tiny_llama, chat_tok, config, strict=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "instances": [{"input": "", "output": "y"}]}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        read_seed_tasks(str(bad))
    with pytest.raises(ConfigError, match="max_samples"):
        RetentionConfig(max_samples=0)


def test_a_gsm8k_run_measures_the_synthetic_task(tmp_path, data_files):
    assert trains_on_gsm8k("gsm8k", None) and not trains_on_gsm8k(None, None)
    assert trains_on_gsm8k("auto", os.path.dirname(data_files[1]), data_files[1])
    assert not trains_on_gsm8k("alpaca", os.path.dirname(data_files[1]), data_files[1])
    task = SyntheticTask(num_train=20, num_val=30, noise=1.0)
    config = RetentionConfig(enabled=True, general_path=data_files[0], other_path=data_files[1], max_samples=5)
    source, pairs = sources(config, gsm8k_run=True, synthetic=task)["other_nll"]
    assert source == SYNTHETIC_SOURCE
    assert pairs == [(r["prompt"], r["completion"]) for r in task.records("val")[:5]] == synthetic_pairs(task, 5)
    assert all(not r["noise_spans"] for r in task.records("val")[:5]), "clean validation answers"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention_run")
    general, other = _write(root / "seed_tasks.jsonl", SEED_TASKS), _write(root / "test.jsonl", GSM8K)
    out = cli("fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_steps=3",
              "--trainer.limit_val_batches=0", "--model.lr=0.03", "--data.synthetic.num_train=32",
              "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}",
              "--eval.retention.enabled=true", f"--eval.retention.general_path={general}", f"--eval.retention.other_path={other}")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, general, other, out.stdout + out.stderr


def test_fit_writes_retention_json_and_metrics(trained_run):
    root, general, other, log = trained_run
    version = root / "lightning_logs" / "version_0"
    record = json.loads((version / "retention.json").read_text())
    for name, path in (("general_nll", general), ("other_nll", other)):
        entry = record[name]
        assert entry["path"] == path and entry["tokens"] > 0
        assert entry["delta"] == pytest.approx(entry["after"] - entry["base"]) and abs(entry["delta"]) > 1e-3
    assert "general-instruction NLL " in log and "→" in log and "other-domain NLL " in log
    header = (version / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("general_nll", "other_nll"):
        for suffix in ("_base", "", "_delta"):
            assert f"retention/{name}{suffix}" in header


def test_fit_takes_the_base_values_of_an_earlier_run(trained_run, tmp_path):
    root, general, other, _ = trained_run
    earlier = json.loads((root / "lightning_logs" / "version_0" / "retention.json").read_text())
    shifted = {name: dict(entry, base=entry["base"] + 1.0) for name, entry in earlier.items()}  # not what a pass gives
    (tmp_path / "base.json").write_text(json.dumps(shifted))
    common = ("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              "--model.lr=0.03", "--data.synthetic.num_train=32", "--model.export=false", "--eval.retention.enabled=true",
              f"--eval.retention.general_path={general}", f"--eval.retention.other_path={other}")
    out = cli(*common, f"--trainer.default_root_dir={tmp_path}/run", f"--eval.retention.base={tmp_path}/base.json")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(next((tmp_path / "run").rglob("retention.json")).read_text())
    for name, entry in record.items():
        assert entry["base"] == shifted[name]["base"] and entry["tokens"] == earlier[name]["tokens"]
        assert entry["delta"] == pytest.approx(entry["after"] - entry["base"])
    other_data = dict(shifted, general_nll=dict(shifted["general_nll"], tokens=shifted["general_nll"]["tokens"] + 1))
    (tmp_path / "other.json").write_text(json.dumps(other_data))
    out = cli(*common, f"--trainer.default_root_dir={tmp_path}/bad", f"--eval.retention.base={tmp_path}/other.json")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"eval.retention.base={tmp_path}/other.json: general_nll was measured on {general}" in out.stderr
    assert "not the same data" in out.stderr and not list((tmp_path / "bad").rglob("retention.json"))


def test_fit_without_the_data_skips_with_a_reason(tmp_path):
    out = cli("fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
              "--trainer.limit_val_batches=0", "--data.synthetic.num_train=8", "--model.export=false",
              "--eval.retention.enabled=true", f"--eval.retention.general_path={tmp_path}/none.jsonl", f"--eval.retention.other_path={tmp_path}/no.jsonl")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert f"general-instruction NLL skipped: no file {tmp_path}/none.jsonl" in log
    assert f"other-domain NLL skipped: no file {tmp_path}/no.jsonl" in log
    assert not list(tmp_path.rglob("retention.json"))


def test_evaluate_reports_the_measures(trained_run, tmp_path):
    root, general, other, _ = trained_run
    version = root / "lightning_logs" / "version_0"
    fit_record = json.loads((version / "retention.json").read_text())
    common = ["--model", str(root), "--config", "configs/tiny.yaml", "--retention", "true", "--num_problems", "0",
              "--general_path", general, "--other_path", other]
    # the base values are the ones fit recorded beside the model
    out = cli("evaluate", *common, "--output", str(tmp_path / "a.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "general-instruction NLL " in out.stdout and "→" in out.stdout
    record = json.loads((tmp_path / "a.retention.json").read_text())
    for name in ("general_nll", "other_nll"):
        assert record[name]["after"] == pytest.approx(fit_record[name]["after"], rel=1e-5), "exported = trained"
        assert record[name]["base"] == fit_record[name]["base"] and record[name]["tokens"] == fit_record[name]["tokens"]
    # --base: computed on that model (here the model itself: no change)
    out = cli("evaluate", *common, "--base", str(version / "hf_model"), "--output", str(tmp_path / "b.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "b.retention.json").read_text())
    assert record["general_nll"]["delta"] == pytest.approx(0.0, abs=1e-9) and "(+0.000)" in out.stdout
    # absent data asked for explicitly: one clear error
    out = cli("evaluate", *common[:-2], "--other_path", str(tmp_path / "none.jsonl"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "none.jsonl (--other_path)" in out.stderr.strip().splitlines()[-1]


def test_the_shared_data_files_parse():
    general = os.path.join(SHARED_DATA, "alpaca_seed_tasks", "seed_tasks.jsonl")
    other = os.path.join(SHARED_DATA, "gsm8k", "test.jsonl")
    if not (os.path.isfile(general) and os.path.isfile(other)):
        pytest.skip(f"the shared data are absent ({SHARED_DATA})")
    pairs = read_seed_tasks(general, limit=None)
    assert len(pairs) >= 150 and all(p.strip() and r.strip() for p, r in pairs)
    answers = read_gsm8k(other, limit=200)
    assert len(answers) == 200 and all("####" in a and "<<" not in a for _, a in answers)
