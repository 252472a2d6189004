"""Every config in configs/methods/ composes with a model/data config and trains from the CLI."""

import glob
import os

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from sstoken_pl.cli import SSTokenCLI
from sstoken_pl.data import SFTDataModule
from sstoken_pl.module import SFTModule
from tests.test_cli import ROOT, cli

METHODS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "methods", "*.yaml")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny reference run (what rho1/tokencleaning point at), exported as fit does."""
    root = tmp_path_factory.mktemp("reference")
    out = cli("fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_steps=1",
              "--trainer.limit_val_batches=0", "--data.synthetic.noise=0")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_every_method_has_a_config():
    assert {"full", "random", "sstoken", "sstoken_ema", "sstoken_snapshot", "rel_only", "attn_only", "sstoken_release",
            "rho1", "tokencleaning", "qtuning"} <= set(METHODS)


def local_method_config(method, reference, tmp_path):
    """``configs/methods/<method>.yaml`` with the reference path set to ``reference`` and a 2-batch threshold pass,
    written under ``tmp_path``; returns its path."""
    with open(os.path.join(ROOT, "configs", "methods", f"{method}.yaml")) as f:
        config = yaml.safe_load(f)
    for cb in config["trainer"]["callbacks+"]:
        if cb["class_path"].endswith("ReferenceModel"):
            cb["init_args"]["path"] = str(reference)
        if cb["class_path"].endswith("TokenSelection") and "threshold_batches" in cb["init_args"]:
            cb["init_args"]["threshold_batches"] = 2
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_method_config_trains(method, reference, tmp_path):
    method_config = local_method_config(method, reference, tmp_path)
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--config", str(method_config),
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--model.export=false", "--data.synthetic.num_train=32", "--data.synthetic.label_noise=0.3"]
    cli_obj = SSTokenCLI(SFTModule, SFTDataModule, args=args, run=False, save_config_callback=None)
    logged = []
    cli_obj.trainer.callbacks.append(_Recorder(logged))
    cli_obj.trainer.fit(cli_obj.model, cli_obj.datamodule)
    assert cli_obj.trainer.global_step == 2
    kept = [m["selection/kept_fraction"] for m in logged if "selection/kept_fraction" in m]
    if method == "full":
        assert not kept
    else:
        assert len(kept) == 2 and all(0.2 < k <= 1.0 for k in kept), kept
        selecting = [m for m, k in zip(logged, kept) if k < 1.0]
        assert all("selection/noise_dropped" in m for m in selecting), "the built-in task's noise is measured"


class _Recorder(Callback):
    """Collects the metrics logged at each training batch."""

    def __init__(self, out):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out.append({k: float(v) for k, v in trainer.callback_metrics.items()})
