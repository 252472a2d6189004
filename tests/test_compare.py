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
    assert set(rows) == {"method", "full", "random", "rho1", "full+clean", "reference (clean subset)"}
    assert "exact match" in rows["method"] and "noise dropped" in rows["method"] and "general NLL Δ" in rows["method"]
    cells = [c.strip() for c in rows["random"].split("|")[1:-1]]
    assert 0.55 < float(cells[1]) < 0.7 and 0 < float(cells[2]) < 1 and cells[6].endswith("(n=1)")
    assert [c.strip() for c in rows["full"].split("|")[2:5]] == ["1.000", "0.000", "1.000"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rows"]) == {"full", "random", "rho1", "full+clean", "reference (clean subset)"}
    assert results["runs"]["rho1"]["0"]["val_curve"]
    evals = [json.loads(line) for line in next((tmp_path / "runs" / "rho1").rglob("eval_after.jsonl")).read_text().splitlines()]
    assert len(evals) == 2 and sum(r["correct"] for r in evals) / 2 == results["runs"]["rho1"]["0"]["accuracy_after"]
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "samples.html").read_text()
    assert page.count("class='sample'") == 2 and "class=\"dropped" in page and "noise" in page
    assert (tmp_path / "reference" / "done.json").is_file(), "rho1 needed a reference, trained once"
    # the reference is a row evaluated like every method; full+clean is full SFT with its clean subset mixed in
    ref = [c.strip() for c in rows["reference (clean subset)"].split("|")[1:-1]]
    assert ref[1] == "1.000" and float(ref[5]) > 0 and ref[6].endswith("(n=1)"), ref
    assert results["runs"]["reference (clean subset)"]["0"]["val_curve"]
    mixed = json.loads((tmp_path / "runs" / "full+clean" / "seed0" / "done.json").read_text())
    assert "--data.synthetic.clean_copies=256" in mixed["command"] and mixed["data_order_seed"] is None
    assert "clean_copies" not in json.loads((tmp_path / "runs" / "full" / "seed0" / "done.json").read_text())["command"]
    assert [c.strip() for c in rows["full+clean"].split("|")[2:5]] == ["1.000", "0.000", "1.000"]
    assert (tmp_path / "target_vs_retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if not list((tmp_path / "runs" / "random").rglob("retention.json")):  # before `fit` measures retention itself
        assert "random: left out (no general NLL Δ)" in (tmp_path / "results.md").read_text()
    kinds = (tmp_path / "results.md").read_text().split("Share of the clean")[1]
    assert "| random |" in kinds and "| rho1 |" in kinds and "| full |" not in kinds
    assert not list(tmp_path.rglob("*.ckpt")), "comparison runs write no Lightning checkpoint by default"
    assert list((tmp_path / "runs" / "random").rglob("hf_model/config.json")), "but they export the model"
    versions = sorted(p for p in tmp_path.rglob("version_*"))
    again = tool("compare.py", *args, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reusing") == 5, again.stdout
    assert sorted(p for p in tmp_path.rglob("version_*")) == versions, "finished runs are not redone"
    # a retention record written after the run (the file is the source of truth) shows in a report
    (tmp_path / "runs" / "random" / "seed0" / "retention.json").write_text(json.dumps(
        {"general_nll": {"base": 2.0, "after": 2.25, "delta": 0.25, "tokens": 10, "path": "x"}}))
    complete = tool("compare.py", *args, "--report-only", timeout=600)
    assert complete.returncode == 0 and "partial report" not in (tmp_path / "results.md").read_text()
    line = next(l for l in (tmp_path / "results.md").read_text().splitlines() if l.startswith("| random |"))
    assert line.endswith("| +0.250 | — |"), line
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
    assert "| sstoken | 0.600 | 0.500 | 0.600 | 0.500 | 2.500 ± 0.141 | 30.0% ± 14.1 (n=2) | 1.50× | — | — |" in table
    assert "| full | 1.000 | 0.000 | 1.000 | 1.000 | 2.000 | 50.0% ± 0.0 (n=1) | 1.00× | — | — |" in table, "one seed: no std"
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


def first_batch(run_dir):
    """The indices of the first training batch's logged samples (selection samples of step 1)."""
    rows = [json.loads(l) for l in next(run_dir.rglob("selection_samples.jsonl")).read_text().splitlines()]
    return [r["index"] for r in rows if r["step"] == 1]


def test_data_order_seeds_shuffle_the_training_data_by_seed(tmp_path):
    base = ["--config", "configs/tiny.yaml", "--methods", "random", "--seeds", "0", "1", "--max-steps", "1",
            "--log-samples-every", "1", "--extra", "--data.synthetic.num_train=64 --trainer.limit_val_batches=0 --eval.num_problems=0"]
    same = tool("compare.py", *base, "--out", str(tmp_path / "same"), timeout=600)
    assert same.returncode == 0, same.stderr[-3000:]
    shuffled = tool("compare.py", *base, "--data-order-seeds", "--out", str(tmp_path / "order"), timeout=600)
    assert shuffled.returncode == 0, shuffled.stderr[-3000:]
    runs = tmp_path / "same" / "runs" / "random"
    assert len(first_batch(runs / "seed0")) == 4 and first_batch(runs / "seed0") == first_batch(runs / "seed1")
    runs = tmp_path / "order" / "runs" / "random"
    assert first_batch(runs / "seed0-order0") != first_batch(runs / "seed1-order1")
    record = json.loads((runs / "seed1-order1" / "done.json").read_text())
    assert record["data_order_seed"] == 1 and record["command"].endswith("--data.seed=1")
    first, second = ([json.loads(p.read_text()) for p in (runs / f).rglob("retention.json")] or [{}]
                     for f in ("seed0-order0", "seed1-order1"))
    first, second = first[0], second[0]
    if any("skipped" not in m for m in first.values()):  # the retention data are here: measured once, then reused
        assert "--eval.retention.base=" in record["command"]
        assert all(second[k]["base"] == first[k]["base"] for k in first if "skipped" not in first[k])
    assert json.loads((tmp_path / "same" / "runs" / "random" / "seed1" / "done.json").read_text())["data_order_seed"] is None
    assert "each seed S also shuffles" in (tmp_path / "order" / "results.md").read_text()
    # a run of the other kind is never reused for this one: its record says which order it trained on
    (runs / "seed0-order0" / "done.json").write_text(json.dumps({**record, "data_order_seed": None}))
    wrong = tool("compare.py", *base, "--data-order-seeds", "--out", str(tmp_path / "order"), "--report-only")
    assert wrong.returncode != 0 and "data order seed None" in wrong.stderr and "Traceback" not in wrong.stderr


def test_retention_records_are_read_and_aggregated(tmp_path):
    run = tmp_path / "run" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    assert compare.read_retention(str(tmp_path / "run")) == {}, "no file: no measure"
    (run / "retention.json").write_text(json.dumps({"general_nll": {"base": 2.0, "after": 2.5, "delta": 0.5, "tokens": 9, "path": "g"}}))
    assert compare.read_retention(str(tmp_path / "run")) == {"general_delta": 0.5, "other_delta": None}
    summary = compare.run_summary(str(tmp_path / "run"), {"val_loss": 1.0, "general_delta": 9.0})
    assert summary["general_delta"] == 0.5 and summary["other_delta"] is None, "the file overrides the logged metric"
    logged = compare.summarise({"retention/general_nll_delta": [(4, 0.3)], "retention/other_nll_delta": [(4, -0.1)]})
    assert logged["general_delta"] == 0.3 and logged["other_delta"] == -0.1
    (run / "retention.json").write_text(json.dumps({"general_nll": {"skipped": "no data", "path": "g"},
                                                     "other_nll": {"base": None, "after": 2.0, "delta": None, "tokens": 3}}))
    assert compare.read_retention(str(tmp_path / "run")) == {"general_delta": None, "other_delta": None}
    (run / "retention.json").write_text(json.dumps({"general_nll": {"base": 2.0, "after": 2.5, "delta": float("nan")}}))
    with pytest.raises(SystemExit, match="retention.json: general_nll's delta is not a finite number"):
        compare.read_retention(str(tmp_path / "run"))
    (run / "retention.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable JSON retention record"):
        compare.read_retention(str(tmp_path / "run"))
    one = dict(kept_fraction=None, noise_dropped=None, clean_kept=None, train_loss=1.0, val_loss=2.0, val_curve=[],
               accuracy_before=None, accuracy_after=0.5, step_time=1.0)
    results = {"full": {0: dict(one, general_delta=0.2, other_delta=None), 1: dict(one, general_delta=0.4, other_delta=0.1)},
               "random": {0: dict(one)}}
    rows = compare.aggregate(results)
    assert rows["full"]["general_delta"] == pytest.approx(0.3) and rows["full"]["general_delta_std"] == pytest.approx(0.1414, abs=1e-3)
    assert rows["full"]["other_delta"] == pytest.approx(0.1) and rows["full"]["other_delta_std"] is None
    table = compare.markdown_table(rows)
    assert "| general NLL Δ | other-domain NLL Δ |" in table
    assert table.splitlines()[2].endswith("| +0.300 ± 0.141 | +0.100 |") and table.splitlines()[3].endswith("| — | — |")


def test_full_clean_mixes_the_reference_clean_subset_in(tmp_path):
    from sstoken_pl.errors import ConfigError
    from sstoken_pl.synthetic import SyntheticTask

    noisy = SyntheticTask(num_train=20, num_val=4, noise=1.0, label_noise=0.5).records("train")
    clean = SyntheticTask(num_train=20, num_val=4, noise=0.0, label_noise=0.0).records("train")
    mixed = SyntheticTask(num_train=20, num_val=4, noise=1.0, label_noise=0.5, clean_copies=8).records("train")
    assert mixed[:20] == noisy and mixed[20:] == clean[:8], "the noisy data, then the clean first 8 problems"
    assert all(r["noise_spans"] == [] for r in mixed[20:]) and all(r["noise_spans"] for r in mixed[:20])
    assert len(SyntheticTask(num_train=20, num_val=4, clean_copies=256).records("train")) == 40, "all, if fewer"
    with pytest.raises(ConfigError, match="clean_copies must be a non-negative integer"):
        SyntheticTask(clean_copies=-1)
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    assert compare.clean_subset(config, [], compare.REFERENCE_ARGS.split()) == (256, "")
    assert compare.clean_subset(config, [], ["--data.synthetic.noise=0", "--data.synthetic.label_noise=0"])[0] is None
    assert "noise=0" in compare.clean_subset(config, [], ["--data.synthetic.noise=0.1", "--data.max_samples=9"])[1]
    assert "not the built-in task" in compare.clean_subset(config, ["--data.path=x.jsonl"], compare.REFERENCE_ARGS.split())[1]
    out = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "full+clean", "--out", str(tmp_path), "--dry-run",
               "--reference-args=--data.max_samples=16")
    assert out.returncode != 0 and "full+clean: --reference-args does not set" in out.stderr and "Traceback" not in out.stderr
    out = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "tokencleaning", "--out", str(tmp_path), "--dry-run")
    assert out.returncode == 0 and "runs/full+clean/seed0" in out.stdout and "--data.synthetic.clean_copies=256" in out.stdout
    assert "runs/full+clean" not in tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "tokencleaning", "--out",
                                          str(tmp_path), "--dry-run", "--no-full-clean").stdout


def test_target_vs_retention_plot(tmp_path):
    row = lambda acc, std, n, g, gs: {"acc_mean": acc, "acc_std": std, "n": n, "general_delta": g, "general_delta_std": gs}
    rows = {"full": row(0.5, 0.1, 2, 0.3, 0.05), "sstoken": row(0.45, 0.0, 1, 0.1, None), "random": row(0.4, 0.0, 1, None, None),
            "noeval": row(None, None, 0, 0.2, None)}
    path = tmp_path / "t.png"
    notes = compare.target_vs_retention(rows, 0.1, str(path), "t")
    assert notes == ["random: left out (no general NLL Δ)", "noeval: left out (no exact match)"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare.target_vs_retention(rows, None, str(path), "t")[0] == "full: left out (no base-model exact match to compare with)"


def test_later_runs_take_the_retention_base_of_a_finished_run(tmp_path):
    assert compare.retention_base(str(tmp_path)) == [], "nothing finished: the run measures its base"
    run = tmp_path / "runs" / "full" / "seed0" / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    record = {"general_nll": {"base": 2.0, "after": 1.9, "delta": -0.1, "tokens": 9, "path": "g"},
              "other_nll": {"base": None, "after": 1.0, "delta": None, "tokens": 3, "path": "o"}}
    (run / "retention.json").write_text(json.dumps(record))
    assert compare.retention_base(str(tmp_path)) == [], "a measure without its base value is no base"
    record["other_nll"] = {"skipped": "no file o", "path": "o"}
    (run / "retention.json").write_text(json.dumps(record))
    assert compare.retention_base(str(tmp_path)) == [f"--eval.retention.base={run / 'retention.json'}"]


def test_a_budget_below_the_sample_interval_still_logs_samples(tmp_path):
    out = tool("compare.py", "--config", "configs/tiny.yaml", "--methods", "random", "--seeds", "0", "--out", str(tmp_path),
               "--max-steps", "3", "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--log-samples-every 10 is beyond --max-steps 3: logging selection samples every 3 steps" in out.stdout
    config = yaml.safe_load((tmp_path / "configs" / "random_seed0.yaml").read_text())
    assert [cb["init_args"]["log_samples_every"] for cb in config["trainer"]["callbacks+"]
            if cb["class_path"].endswith("TokenSelection")] == [3]


def test_one_logged_step_is_drawn_as_bars(tmp_path, monkeypatch):
    import compare_report

    drawn = []
    monkeypatch.setattr(compare_report, "_final_loss_bars", lambda ax, results, colors: drawn.append(sorted(results)))
    one = {"val_curve": [(3, 2.0)]}
    compare_report.plot({"full": {0: one}, "random": {0: {"val_curve": [(3, 2.2)]}}}, str(tmp_path / "a.png"), "t")
    assert drawn == [["full", "random"]] and (tmp_path / "a.png").is_file()
    compare_report.plot({"full": {0: {"val_curve": [(3, 2.0), (6, 1.5)]}}}, str(tmp_path / "b.png"), "t")
    assert len(drawn) == 1, "a curve of two points stays a line"


def test_the_header_says_when_the_base_model_was_not_evaluated(tmp_path):
    from types import SimpleNamespace

    import compare_report

    run = dict(kept_fraction=None, noise_dropped=None, clean_kept=None, train_loss=1.0, val_loss=2.0, val_curve=[(4, 2.0)],
               accuracy_before=None, accuracy_after=0.5, step_time=1.0, general_delta=None, other_delta=None)
    args = SimpleNamespace(seeds=[0], methods=["full"], data_order_seeds=False, extra="", max_steps=4, reference_args="",
                           html_samples=2)
    compare_report.write_report(args, str(tmp_path), "configs/tiny.yaml", "python tools/compare.py", {"full": {0: run}}, {})
    text = (tmp_path / "results.md").read_text()
    assert "exact match of the base model before training: not measured" in text and "—%" not in text
    compare_report.write_report(args, str(tmp_path), "configs/tiny.yaml", "python tools/compare.py",
                                {"full": {0: dict(run, accuracy_before=0.125)}}, {})
    assert "exact match of the base model before training: 12.5%" in (tmp_path / "results.md").read_text()


def test_score_once_scores_each_fixed_model_once_for_every_method_and_seed(tmp_path):
    """sstoken and rel_only (base history) and rho1 (reference): 2 scoring passes, and every run reads the stores."""
    args = ["--config", "configs/tiny.yaml", "--methods", "sstoken", "rel_only", "rho1", "asft", "--seeds", "0", "--out",
            str(tmp_path), "--max-steps", "2", "--no-full-clean", "--score-once", "--extra",
            "--data.synthetic.num_train=32 --data.synthetic.noise=0.5 --trainer.limit_val_batches=0 --eval.num_problems=0"]
    out = tool("compare.py", *args, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    assert "scoring passes: 2" in out.stdout
    assert json.loads((tmp_path / "scores" / "base" / "meta.json").read_text())["complete"]
    assert json.loads((tmp_path / "scores" / "reference" / "meta.json").read_text())["complete"]
    configs = {p.name: yaml.safe_load(p.read_text()) for p in (tmp_path / "configs").glob("*_seed*.yaml")}
    by_class = lambda cfg: {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in cfg["trainer"]["callbacks+"]}  # noqa: E731
    for method in ("sstoken", "rel_only"):
        assert by_class(configs[f"{method}_seed0.yaml"])["HistoryModel"]["scores"] == str(tmp_path / "scores" / "base")
    assert by_class(configs["rho1_seed0.yaml"])["ReferenceModel"]["scores"] == str(tmp_path / "scores" / "reference")
    assert "scores" not in by_class(configs["asft_seed0.yaml"])["HistoryModel"], "asft needs the base model's logits"
    again = tool("compare.py", *args, timeout=600)
    assert again.returncode == 0 and "scoring passes: 0" in again.stdout


def test_point_names_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 10], [0, 1])
    labels = [("sstoken_release", 3.0, 0.5, "C0"), ("sstoken", 3.2, 0.5, "C1"), ("sstoken_ema", 3.1, 0.5, "C2"), ("full", 9.0, 0.1, "C3")]
    offsets = compare.place_labels(fig, ax, labels)
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == [name for name, *_ in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert offsets[3] == (7, 6) and len(set(offsets[:3])) == 3  # the far point keeps the first place
    plt.close(fig)


def test_point_names_keep_off_other_markers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    fig, ax = plt.subplots()
    ax.set_xlim(0, 50)
    ax.set_ylim(-0.02, 0.1)
    labels = [("rho1", 18.8, -0.016, "C0"), ("reference (clean subset)", 15.6, -0.0145, "C1")]
    compare.place_labels(fig, ax, labels)
    renderer = fig.canvas.get_renderer()
    px, py = ax.transData.transform((18.8, -0.016))
    marker = Bbox.from_extents(px - 6, py - 6, px + 6, py + 6)
    assert not ax.texts[1].get_window_extent(renderer).overlaps(marker)  # the reference's name is not on rho1's point
    plt.close(fig)


def test_point_names_stay_inside_the_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xlim(-0.5, 0.5)
    ax.set_ylim(-0.08, 0.0)
    labels = [("full", 0.0, -0.07, "C0"), ("random", 0.5, -0.07, "C1")]  # random's point on the right edge
    offsets = compare.place_labels(fig, ax, labels)
    renderer = fig.canvas.get_renderer()
    frame, box = ax.get_window_extent(renderer), ax.texts[1].get_window_extent(renderer)
    assert offsets[0] == (7, 6) and offsets[1][0] < 0  # the edge point is named on its left
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1
    plt.close(fig)


def _waiter(me: str, other: str, seconds: float) -> str:
    """A job that marks itself started, then waits for ``other`` to start: it can only succeed if both run at once."""
    return (f"import os, pathlib, sys, time; pathlib.Path({me!r}).write_text(os.environ.get('OMP_NUM_THREADS', '-'))\n"
            f"end = time.time() + {seconds}\n"
            f"while not os.path.exists({other!r}) and time.time() < end: time.sleep(0.05)\n"
            f"sys.exit(0 if os.path.exists({other!r}) else 3)")


def test_jobs_run_at_once_with_their_share_of_the_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    a, b = str(tmp_path / "a.started"), str(tmp_path / "b.started")
    finished = []
    jobs = [([compare.sys.executable, "-c", _waiter(a, b, 60)], str(tmp_path / "a"), finished.append),
            (lambda: [compare.sys.executable, "-c", _waiter(b, a, 60)], str(tmp_path / "b"), finished.append)]
    compare.run_many(jobs, 2, dry_run=False)  # one at a time, the first would wait for the second in vain: exit 3
    assert len(finished) == 2 and all(cmd[0] == compare.sys.executable for cmd in finished)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert pathlib.Path(a).read_text() == threads and pathlib.Path(b).read_text() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's setting wins
    os.remove(a), os.remove(b)
    compare.run_many(jobs, 2, dry_run=False)
    assert pathlib.Path(a).read_text() == "7" and len(finished) == 4


def test_a_failed_job_lets_the_running_ones_finish_and_starts_no_other(tmp_path):
    done = []
    slow = "import time, pathlib; time.sleep(1); pathlib.Path('{}').write_text('ok')".format(tmp_path / "slow.out")
    jobs = [([compare.sys.executable, "-c", "import sys; print('ValueError: bad field'); sys.exit(2)"], str(tmp_path / "bad"), done.append),
            ([compare.sys.executable, "-c", slow], str(tmp_path / "slow"), lambda cmd: done.append("slow")),
            ([compare.sys.executable, "-c", "pass"], str(tmp_path / "never"), done.append)]
    with pytest.raises(SystemExit) as e:
        compare.run_many(jobs, 2, dry_run=False)
    assert str(e.value).count("\n") == 1 and "bad failed (exit 2): ValueError: bad field" in str(e.value)
    assert str(tmp_path / "bad" / "log.txt") in str(e.value)
    assert done == ["slow"] and (tmp_path / "slow.out").read_text() == "ok", "the running run finished and was recorded"
    assert not (tmp_path / "never").exists(), "no run starts after a failure"


def test_a_comparison_with_jobs_matches_one_run_at_a_time(tmp_path):
    base = ["--config", "configs/tiny.yaml", "--methods", "full", "random", "--seeds", "0", "--max-steps", "2",
            "--log-samples-every", "1", "--extra", "--data.synthetic.num_train=64 --trainer.val_check_interval=2 "
            "--trainer.limit_val_batches=1 --eval.num_problems=0"]
    serial = tool("compare.py", *base, "--out", str(tmp_path / "serial"), timeout=600)
    assert serial.returncode == 0, serial.stderr[-3000:]
    parallel = tool("compare.py", *base, "--jobs", "2", "--out", str(tmp_path / "jobs"), timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("serial", "jobs"))
    for method in ("full", "random"):
        assert two[method]["0"]["val_loss"] == pytest.approx(one[method]["0"]["val_loss"], rel=1e-3)
        record = json.loads((tmp_path / "jobs" / "runs" / method / "seed0" / "done.json").read_text())
        assert record["parallel_runs"] == 2
    assert "parallel_runs" not in json.loads((tmp_path / "serial" / "runs" / "full" / "seed0" / "done.json").read_text())
    assert "the step-time column is not a cost" in (tmp_path / "jobs" / "results.md").read_text()
    assert "not a cost" not in (tmp_path / "serial" / "results.md").read_text()
    again = tool("compare.py", *base, "--jobs", "2", "--out", str(tmp_path / "jobs"), "--report-only")
    assert again.returncode == 0 and "not a cost" in (tmp_path / "jobs" / "results.md").read_text(), "reused runs say so too"
    zero = tool("compare.py", *base, "--jobs", "0", "--out", str(tmp_path / "x"))
    assert zero.returncode != 0 and "--jobs 0" in zero.stderr and "Traceback" not in zero.stderr


def test_a_method_added_later_does_not_evaluate_the_base_model_again(tmp_path):
    finished = tmp_path / "runs" / "full" / "seed0-order0"
    finished.mkdir(parents=True)
    summary = dict(kept_fraction=None, noise_dropped=None, clean_kept=None, train_loss=1.0, val_loss=2.0, val_curve=[(4, 2.0)],
                   accuracy_before=0.125, accuracy_after=0.5, step_time=1.0, general_delta=None, other_delta=None)
    (finished / "done.json").write_text(json.dumps({"command": "python -m sstoken_pl fit", "data_order_seed": 0, "summary": summary}))
    base = ["--config", "configs/tiny.yaml", "--methods", "random", "--seeds", "0", "--out", str(tmp_path)]
    added = tool("compare.py", *base, "--data-order-seeds", "--dry-run")
    assert added.returncode == 0, added.stderr
    assert "--eval.before=false" in added.stdout and "--eval.before=true" not in added.stdout
    other_kind = tool("compare.py", *base, "--dry-run")  # runs on the config's data order: no run of that kind yet
    assert other_kind.returncode == 0 and "--eval.before=true" in other_kind.stdout
    (tmp_path / "runs" / "random" / "seed0-order0").mkdir(parents=True)
    (tmp_path / "runs" / "random" / "seed0-order0" / "done.json").write_text(
        json.dumps({"command": "python -m sstoken_pl fit", "data_order_seed": 0, "summary": dict(summary, accuracy_before=None)}))
    report = tool("compare.py", *base, "--data-order-seeds", "--report-only")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "exact match of the base model before training: 12.5%" in (tmp_path / "results.md").read_text()
