"""The CLI as a user runs it: ``python -m sstoken_pl fit --config configs/tiny.yaml ...`` in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=ROOT, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "sstoken_pl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_tiny_sstoken_end_to_end(tmp_path):
    out = cli(
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken.yaml",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoints = list((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "checkpoints are saved under trainer.default_root_dir"
    assert (run / "hf_model" / "config.json").is_file(), "the model is exported at the end of fit"
    assert (run / "config.yaml").is_file()
    metrics = (run / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for name in ("train/loss", "selection/kept_fraction", "selection/rel_mean", "selection/attn_mean", "val/ppl"):
        assert name in header, name
    col = header.index("selection/kept_fraction")
    kept = [float(row.split(",")[col]) for row in metrics[1:] if row.split(",")[col]]
    assert kept and all(0.55 < k < 0.75 for k in kept)
    ckpt = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert any("HistoryModel" in key for key in ckpt["callbacks"]), "the history state is checkpointed"


def test_resume_from_checkpoint(tmp_path):
    common = ["--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken_ema.yaml",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0", "--model.export=false"]
    first = cli("fit", *common, "--trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    second = cli("fit", *common, "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    assert second.returncode == 0, second.stderr[-3000:]
    # the resume continues in the run's own folder: no version_1, no "dirpath has changed" warning
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert "dirpath has changed" not in second.stderr + second.stdout
    state = torch.load(next((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*step=4.ckpt")), weights_only=False)
    history = next(v for k, v in state["callbacks"].items() if "HistoryModel" in k)
    assert state["global_step"] == 4 and history["last_step"] == 4
    events = list((tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents*"))
    assert len(events) == 2, "the resumed run's logs are beside the first part's"
    checked = cli("validate", *common[:4], f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt}")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"], "validate: the run's folder"


def test_print_config_composes_method_callbacks():
    out = cli("fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken.yaml", "--print_config")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("HistoryModel", "AttentionScore", "TokenSelection", "model_config"):
        assert name in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data.path", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["--model.lr", "-1"], "lr"),
        (["--config", "configs/methods/sstoken.yaml", "--trainer.callbacks.ratio", "1.5"], "ratio"),
        (["--config", "configs/methods/sstoken.yaml", "--config", "configs/methods/sstoken_ema.yaml"], "more than one"),
    ],
)
def test_bad_input_is_one_clear_error(args, expected, tmp_path):
    out = cli("fit", "--config", "configs/tiny.yaml", *args, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert expected in out.stderr
    assert not list(tmp_path.rglob("events.out.tfevents*")), "no run folder for a run that never started"


@pytest.mark.parametrize("args, key", [(["--model.schedule=fast"], "model.schedule"),
                                       (["--model.fused_cross_entropy=fast"], "model.fused_cross_entropy")])
def test_a_value_the_parser_refuses_is_a_short_error(args, key, tmp_path):
    # not the usage of every option (hundreds of lines): one usage line, the --help hint, the error naming the key
    out = cli("fit", "--config", "configs/tiny.yaml", *args, f"--trainer.default_root_dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "usage: python -m sstoken_pl fit [-c CONFIG] [--KEY VALUE ...]", lines[:3]
    assert key in out.stderr and "--trainer.accelerator" not in out.stderr
    assert len(lines) <= 12


def test_malformed_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    out = cli("fit", "--config", "configs/tiny.yaml", f"--data.path={data}", "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path}/run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{data} line 2" in out.stderr
    assert not (tmp_path / "run").exists(), "a data error leaves no empty lightning_logs/version_N"


def test_ddp_two_cpu_processes(tmp_path):
    out = cli(
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken_ema.yaml",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "config.json").is_file()


@pytest.mark.parametrize("extra, bar", [([], "StepProgressBar"), (["--trainer.enable_progress_bar=false"], None),
                                        (["--trainer.callbacks+=TQDMProgressBar"], "TQDMProgressBar")])
def test_the_default_progress_bar_counts_steps(tmp_path, extra, bar):
    from sstoken_pl.cli import SSTokenCLI
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    cli = SSTokenCLI(SFTModule, SFTDataModule, run=False, save_config_callback=None, args=[
        "--config", os.path.join(ROOT, "configs/tiny.yaml"), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--model.export=false",
        f"--trainer.default_root_dir={tmp_path}", "--data.synthetic.num_train=16", *extra])
    trainer = cli.trainer
    assert (type(trainer.progress_bar_callback).__name__ if trainer.progress_bar_callback else None) == bar
    if bar != "StepProgressBar":
        return
    trainer.fit(cli.model, cli.datamodule)
    shown = trainer.progress_bar_callback.get_metrics(trainer, cli.model)
    assert shown["step"] == "2/2" and "v_num" not in shown and "train/loss" in shown
    assert trainer.progress_bar_callback._get_train_description(0).strip() == "Epoch 0", "not Epoch 0/-2"


@pytest.mark.parametrize("bar", [True, False])
def test_the_answer_evaluation_shows_its_progress(tmp_path, bar):
    out = cli("fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              "--model.export=false", "--data.synthetic.num_train=16", "--eval.num_problems=3", "--eval.max_new_tokens=2",
              f"--trainer.enable_progress_bar={str(bar).lower()}", f"--trainer.default_root_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    for when in ("before", "after"):
        assert (f"Generating answers ({when} training)" in out.stderr) == bar, out.stderr[-2000:]
