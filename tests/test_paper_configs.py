"""configs/paper/: the ssToken paper's recipe resolves to the authors' settings with every method of the comparison,
and each combination trains two optimizer steps with the laptop smoke overlay (configs/paper/smoke.yaml), exactly as
configs/paper/README.md tells a user to run it."""

import glob
import json
import os

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from sstoken_pl.cli import SSTokenCLI, main
from sstoken_pl.data import SFTDataModule
from sstoken_pl.models import find_exported_model
from sstoken_pl.module import SFTModule
from tests.test_cli import ROOT

PAPER = os.path.join(ROOT, "configs", "paper")
RECIPE = os.path.join(PAPER, "llama3.2-3b.yaml")
REFERENCE = os.path.join(PAPER, "reference_warmup.yaml")
SMOKE = os.path.join(PAPER, "smoke.yaml")
# The paper's comparison at ρ = 0.6: method -> its config, and the callbacks that config adds.
METHODS = {
    "full": ("configs/methods/full.yaml", []),
    "random": ("configs/methods/random.yaml", ["TokenSelection"]),
    "sstoken_release": ("configs/methods/sstoken_release.yaml", ["HistoryModel", "AttentionScore", "TokenSelection"]),
    "rho1": ("configs/paper/rho1.yaml", ["TokenSelection", "ReferenceModel"]),
    "tokencleaning": ("configs/paper/tokencleaning.yaml", ["HistoryModel", "TokenSelection", "ReferenceModel"]),
    "qtuning": ("configs/methods/qtuning.yaml", ["SequenceEntropy", "TokenSelection"]),
}
NEEDS_REFERENCE = {"rho1", "tokencleaning"}


def resolved(capsys, *configs, extra=()):
    """The config `fit --print_config` prints for these configs (in-process: the CLI's own entry point)."""
    args = ["fit"]
    for config in configs:
        args += ["--config", config if os.path.isabs(config) else os.path.join(ROOT, config)]
    with pytest.raises(SystemExit) as stop:
        main([*args, *extra, "--print_config"])
    out = capsys.readouterr()
    assert stop.value.code in (None, 0), out.err[-3000:]
    return yaml.safe_load(out.out)


def callback_names(config):
    return [cb["class_path"].rsplit(".", 1)[1] for cb in config["trainer"]["callbacks"] or []]


def test_every_paper_config_is_covered():
    """A config added to configs/paper/ without a test here fails (this file's combinations are the README's)."""
    here = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(PAPER, "*.yaml"))}
    known = {os.path.relpath(p, ROOT) for p in (RECIPE, REFERENCE, SMOKE)}
    known |= {path for path, _ in METHODS.values() if path.startswith("configs/paper/")}
    assert here == known
    readme = open(os.path.join(PAPER, "README.md"), encoding="utf-8").read()
    for path in sorted(known | {path for path, _ in METHODS.values()}):
        assert path in readme, f"configs/paper/README.md does not say how to run {path}"


def test_recipe_resolves_to_the_authors_settings(capsys):
    config = resolved(capsys, RECIPE)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"  # FSDP2
    assert (trainer["accelerator"], trainer["precision"], trainer["max_epochs"]) == ("cuda", "bf16-mixed", 1)
    assert trainer["devices"] * data["batch_size"] * trainer["accumulate_grad_batches"] == 48
    assert (trainer["devices"], data["batch_size"], trainer["accumulate_grad_batches"]) == (8, 3, 2)
    assert model["model_name_or_path"] == "meta-llama/Llama-3.2-3B" and model["model_config"] is None
    assert model["lora"] == {"r": 64, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
    assert (model["lr"], model["schedule"], model["warmup_ratio"], model["weight_decay"]) == (1e-4, "linear", 0.03, 0)
    assert (data["path"], data["format"], data["max_length"], data["val_size"]) == ("jlpang888/DS2_50k", "messages", 2048, 0)
    assert data["max_samples"] is None, "the methods train on the whole pool"
    assert config["eval"]["num_problems"] == 0
    assert not callback_names(config), "the recipe itself selects nothing: the method config adds the callbacks"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_combination_resolves(method, capsys):
    path, callbacks = METHODS[method]
    config = resolved(capsys, RECIPE, path)
    assert callback_names(config) == callbacks
    reference_run = resolved(capsys, RECIPE, REFERENCE)["trainer"]["default_root_dir"]
    for cb in config["trainer"]["callbacks"]:
        args = cb["init_args"]
        if cb["class_path"].endswith("TokenSelection") and method == "qtuning":
            # the authors' own setting ("wise wise 50 70"): half the samples, 70% of their tokens
            assert (args["ratio"], args["options"]["sample_ratio"]) == (0.7, 0.5)
        elif cb["class_path"].endswith("TokenSelection"):
            assert args["ratio"] == 0.6, "the same token budget for every method"
            if method == "tokencleaning":
                assert args["threshold_batches"] is None, "the threshold over the whole pool"
            if method == "sstoken_release":
                assert (args["gamma"], args["early_gamma"], args["early_fraction"]) == (0.5, 0.0, 0.2)
        if cb["class_path"].endswith("HistoryModel"):
            assert args["mode"] == "base"
        if cb["class_path"].endswith("ReferenceModel"):
            assert args["path"] == reference_run, "the reference is the run configs/paper/reference_warmup.yaml trains"
    assert resolved(capsys, RECIPE, path, SMOKE, extra=["--data.path=x.jsonl"])["trainer"]["strategy"] == "auto"


def test_reference_run_resolves(capsys):
    config = resolved(capsys, RECIPE, REFERENCE)
    assert config["data"]["max_samples"] == 10000 and not callback_names(config)
    assert config["trainer"]["default_root_dir"] != resolved(capsys, RECIPE)["trainer"]["default_root_dir"]


# ---------------------------------------------------------------------------------------------------- two steps
def write_messages(path, n=16):
    """A tiny dataset in the paper config's format: `messages` records, some multi-turn with a system turn."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = 3 * i + 1, 7 * i + 2
            turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            if i % 4 == 0:
                turns = [{"role": "system", "content": "Answer briefly."}, *turns,
                         {"role": "user", "content": "And times?"}, {"role": "assistant", "content": f"{a * b}."}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def smoke_args(config, data, root, *extra):
    """The laptop smoke test of configs/paper/README.md: recipe, method (or reference), smoke overlay, a local file."""
    return ["--config", RECIPE, "--config", os.path.join(ROOT, config), "--config", SMOKE, f"--data.path={data}",
            f"--trainer.default_root_dir={root}", *extra]


def fit(args):
    cli = SSTokenCLI(SFTModule, SFTDataModule, args=args, run=False, save_config_callback=None)
    logged = _Recorder()
    cli.trainer.callbacks.append(logged)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, logged.out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_messages(tmp_path_factory.mktemp("data") / "pool.jsonl")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    cli, logged = fit(smoke_args(os.path.relpath(REFERENCE, ROOT), data, root))
    assert cli.trainer.global_step == 2 and cli.datamodule.max_samples == 10000
    assert not any("selection/kept_fraction" in m for m in logged), "the reference is plain SFT"
    exported = find_exported_model(str(root))
    assert exported != str(root) and os.path.isfile(os.path.join(exported, "config.json"))
    return root


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_two_steps(method, data, tmp_path, request):
    path, callbacks = METHODS[method]
    extra = [f"--trainer.callbacks.path={request.getfixturevalue('reference')}"] if method in NEEDS_REFERENCE else []
    cli, logged = fit(smoke_args(path, data, tmp_path, *extra))
    trainer = cli.trainer
    assert trainer.global_step == 2
    assert len(logged) == 4, "2 optimizer steps × accumulate_grad_batches 2 micro-batches"
    assert trainer.precision == "bf16-mixed" and trainer.accumulate_grad_batches == 2
    assert [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in
            ("HistoryModel", "AttentionScore", "ReferenceModel", "SequenceEntropy", "TokenSelection")] == callbacks
    kept = [m["selection/kept_fraction"] for m in logged if "selection/kept_fraction" in m]
    if method == "full":
        assert not kept
    elif method == "qtuning":  # about sample_ratio · ratio = 0.35 of the attended tokens, so fewer response tokens
        assert len(kept) == 4 and all(0.1 < k < 0.6 for k in kept), kept
    else:
        assert len(kept) == 4 and all(0.3 < k < 1.0 for k in kept), kept
    assert all(m["train/loss"] == m["train/loss"] for m in logged if "train/loss" in m), "finite losses"
    assert os.path.isfile(os.path.join(find_exported_model(str(tmp_path)), "config.json")), "hf_model for lm-eval"


class _Recorder(Callback):
    """The metrics logged at each training micro-batch."""

    def __init__(self):
        self.out = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out.append({k: float(v) for k, v in trainer.callback_metrics.items()})
