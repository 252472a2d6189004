"""``tools/compare.py``: an end-to-end comparison on the tiny config, resuming, and its report builders."""

import importlib.util
import json
import os
import pathlib

import pytest
import yaml

from tests.test_cli import ROOT
from tests.test_tools import tool

spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "tools", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

EXTRA = ("--data.synthetic.num_train=64 --data.synthetic.noise=0.5 --data.synthetic.label_noise=0.3 "
         "--trainer.val_check_interval=2 --trainer.limit_val_batches=1 --eval.num_problems=2 --eval.max_new_tokens=4")


def test_compare_end_to_end_and_resume(tmp_path):
    args = ["--config", "configs/tiny.yaml", "--methods", "full", "random", "rho1", "--seeds", "0", "--out", str(tmp_path),
            "--max-steps", "4", "--extra", EXTRA, "--log-samples-every", "2", "--html-samples", "2"]
    out = tool("compare.py", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    table = (tmp_path / "results.md").read_text().split("Share of the clean")[0]  # the main table, not the kinds one
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "full", "random", "rho1"}
    assert "exact match" in rows["method"] and "noise dropped" in rows["method"]
    cells = [c.strip() for c in rows["random"].split("|")[1:-1]]
    assert 0.55 < float(cells[1]) < 0.7 and 0 < float(cells[2]) < 1 and cells[6].endswith("(n=1)")
    assert [c.strip() for c in rows["full"].split("|")[2:5]] == ["1.000", "0.000", "1.000"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rows"]) == {"full", "random", "rho1"} and results["runs"]["rho1"]["0"]["val_curve"]
    evals = [json.loads(line) for line in next((tmp_path / "runs" / "rho1").rglob("eval_after.jsonl")).read_text().splitlines()]
    assert len(evals) == 2 and sum(r["correct"] for r in evals) / 2 == results["runs"]["rho1"]["0"]["accuracy_after"]
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "samples.html").read_text()
    assert page.count("class='sample'") == 2 and "class=\"dropped" in page and "noise" in page
    assert (tmp_path / "reference" / "done.json").is_file(), "rho1 needed a reference, trained once"
    kinds = (tmp_path / "results.md").read_text().split("Share of the clean")[1]
    assert "| random |" in kinds and "| rho1 |" in kinds and "| full |" not in kinds
    assert not list(tmp_path.rglob("*.ckpt")), "comparison runs write no Lightning checkpoint by default"
    assert list((tmp_path / "runs" / "random").rglob("hf_model/config.json")), "but they export the model"
    versions = sorted(p for p in tmp_path.rglob("version_*"))
    again = tool("compare.py", *args, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing") == 4, again.stdout
    assert sorted(p for p in tmp_path.rglob("version_*")) == versions, "finished runs are not redone"
    complete = tool("compare.py", *args, "--report-only", timeout=600)
    assert complete.returncode == 0 and "partial report" not in (tmp_path / "results.md").read_text()
    args[args.index("--methods") + 1 : args.index("--seeds")] = ["full", "random", "sstoken"]
    partial = tool("compare.py", *args, "--report-only", timeout=600)
    assert partial.returncode == 0 and "sstoken seed 0: not run yet" in partial.stdout, partial.stdout + partial.stderr[-2000:]
    report = (tmp_path / "results.md").read_text()
    assert "2 of 3 runs finished" in report and "| random |" in report and "| sstoken |" not in report
    assert sorted(p for p in tmp_path.rglob("version_*")) == versions, "a report runs nothing"


def test_a_failed_run_is_one_line_naming_its_log(tmp_path):
    out = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "full", "--out", str(tmp_path),
               "--extra=--data.synthetic.noise=2")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "failed" in out.stderr and "log.txt" in out.stderr and "noise must be in [0, 1]" in out.stderr


def test_a_method_of_your_own_is_a_yaml_path(tmp_path):
    mine = tmp_path / "snap3.yaml"
    mine.write_text((pathlib.Path(ROOT) / "configs/methods/sstoken_snapshot.yaml").read_text().replace("snapshot_every: 100", "snapshot_every: 3"))
    out = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "random", str(mine), "--out", str(tmp_path / "o"), "--dry-run")
    assert out.returncode == 0, out.stderr
    written = yaml.safe_load((tmp_path / "o" / "configs" / "snap3_seed0.yaml").read_text())
    history = [c for c in written["trainer"]["callbacks+"] if c["class_path"].endswith("HistoryModel")]
    assert history[0]["init_args"] == {"mode": "snapshot", "snapshot_every": 3}
    assert "runs/snap3/seed0" in out.stdout and "runs/random/seed0" in out.stdout
    missing = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert missing.returncode != 0 and "no file" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "random.yaml").write_text("{}")
    twice = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "random", str(tmp_path / "random.yaml"), "--out", str(tmp_path / "o"))
    assert twice.returncode != 0 and "names a method twice" in twice.stderr and "Traceback" not in twice.stderr
    (tmp_path / "bad.yaml").write_text("- a list\n")
    bad = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o"), "--dry-run")
    assert bad.returncode != 0 and "bad.yaml: a method config is a mapping" in bad.stderr and "Traceback" not in bad.stderr


def test_a_full_disk_is_named_as_such(tmp_path):
    crash = "import sys; print('Traceback ...'); print('OSError: [Errno 28] No space left on device'); print('  at x'); sys.exit(1)"
    with pytest.raises(SystemExit) as e:
        compare.run([compare.sys.executable, "-c", crash], str(tmp_path / "run"), dry_run=False)
    assert "no space left on device" in str(e.value) and "GiB free" in str(e.value) and "log.txt" in str(e.value)
    assert "finished runs are kept" in str(e.value)


def test_table_and_html_builders():
    results = {
        "full": {0: dict(kept_fraction=None, noise_dropped=None, clean_kept=None, train_loss=1.0, val_loss=2.0, val_curve=[(10, 2.0)],
                         accuracy_before=0.1, accuracy_after=0.5, step_time=1.0)},
        "sstoken": {s: dict(kept_fraction=0.6, noise_dropped=0.5, clean_kept=0.6, train_loss=0.5, val_loss=v, val_curve=[(10, v)],
                            accuracy_before=None, accuracy_after=a, step_time=1.5) for s, a, v in [(0, 0.2, 2.4), (1, 0.4, 2.6)]},
    }
    rows = compare.aggregate(results)
    assert rows["sstoken"]["acc_mean"] == pytest.approx(0.3) and rows["sstoken"]["acc_std"] == pytest.approx(0.1414, abs=1e-3)
    assert rows["sstoken"]["time_ratio"] == pytest.approx(1.5) and rows["full"]["noise_dropped"] == 0.0
    results["full"][1] = dict(results["full"][0], step_time=4.0)
    results["random"] = {1: dict(results["sstoken"][1], step_time=6.0)}
    paired = compare.aggregate(results)
    assert paired["random"]["time_ratio"] == pytest.approx(1.5), "against full SFT of the same seed"
    assert paired["sstoken"]["time_ratio"] == pytest.approx((1.5 + 1.5 / 4) / 2)
    table = compare.markdown_table(rows)
    assert "| sstoken | 0.600 | 0.500 | 0.600 | 0.500 | 2.500 ± 0.141 | 30.0% ± 14.1 (n=2) | 1.50× |" in table
    assert "| full | 1.000 | 0.000 | 1.000 | 1.000 | 2.000 | 50.0% ± 0.0 (n=1) | 1.00× |" in table, "one seed: no std"
    samples = {
        "full": [],
        "sstoken": [{"step": 10, "index": 3, "tokens": ["<b>", " & ", "x"], "kept": [1, 0, 1], "noise": [0, 1, 0]}],
    }
    page = compare.samples_html(samples, ["full", "sstoken"], 4, "t")
    assert "&lt;b&gt;" in page and "<b>x" not in page
    assert '<span class="dropped noise"> &amp; </span>' in page
    assert page.count('<span class="kept">&lt;b&gt;</span>') == 2, "full's row keeps every token"
    assert "No run logged" in compare.samples_html({"full": []}, ["full"], 4, "t")
    # a method not finished yet gets no row (it is not full SFT); no noise in the data: no noise in the legend
    page = compare.samples_html(samples, ["full", "sstoken", "rho1"], 4, "t")
    assert "rho1" not in page and page.count("class='method'") == 2
    clean = {"sstoken": [{"step": 10, "index": 3, "tokens": ["a", "b"], "kept": [1, 0]}]}
    assert "injected noise" not in compare.samples_html(clean, ["sstoken"], 4, "t")
    assert "injected noise" in page


def test_kept_by_token_kind_counts_clean_tokens_only():
    assert [compare.token_kind(t) for t in ["<|im_end|>", "####", " 12", " books", " =", "\n"]] == [
        "end of turn", "answer marker", "digits", "words", "other", "other"]
    samples = [{"tokens": [" 3", " 4", " cats", "####", "<|im_end|>", " zz"], "kept": [1, 0, 1, 0, 1, 0], "noise": [0, 0, 0, 0, 0, 1]}]
    kinds = compare.kept_by_kind(samples)
    assert kinds["digits"] == (0.5, 2) and kinds["words"] == (1.0, 1), "the noise token ' zz' is not counted"
    assert kinds["answer marker"] == (0.0, 1) and kinds["end of turn"] == (1.0, 1) and kinds["other"] == (None, 0)
    table = compare.kinds_table({"m": samples, "full": []})
    assert "| m | 1.00 | 0.00 | 0.50 | 1.00 | — |" in table and "full" not in table
