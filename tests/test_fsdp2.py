"""FSDP2 (``fully_shard`` under Lightning's ``ModelParallelStrategy``) on 2 CPU processes (gloo) equals 1 process on
the same global batch: LoRA and full fine-tuning, each HistoryModel mode, the reference model, the base-anchored
objective (ASFT), packed batches (each rank packs its own); checkpoints resume
exactly; export and the answer evaluation work under sharding; impossible strategy combinations are refused."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml

from sstoken_pl import sharding
from sstoken_pl.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "fsdp2_cases.py")
TRAIN = [f"{k}-{m}" for k in ("lora", "full") for m in ("base", "snapshot", "ema", "reference", "asft")] + ["lora-packed"]
RESUME = ["resume-full-ema", "resume-lora-snapshot", "resume1file-lora-ema"]


def _env(reference):
    return dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SSTOKEN_TEST_REFERENCE=reference)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on 1 process and on 2 (FSDP2): one script invocation each."""
    from sstoken_pl.models import load_causal_lm, tiny_llama_config

    root = tmp_path_factory.mktemp("fsdp2")
    reference = str(root / "reference")
    load_causal_lm(config=tiny_llama_config(), seed=1).save_pretrained(reference)
    out = {}
    for devices, cases in ((1, TRAIN), (2, TRAIN + RESUME)):
        target = root / str(devices)
        run = subprocess.run([sys.executable, SCRIPT, str(target), str(devices), *cases], cwd=ROOT, env=_env(reference),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        out[devices] = target
    return out


def _load(runs, devices, case):
    return torch.load(runs[devices] / f"{case}.pt", weights_only=False)


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(((a[n].float() - b[n].float()).abs().max().item() for n in a), default=0.0)


@pytest.mark.parametrize("case", TRAIN)
def test_two_fsdp2_processes_equal_one_process(runs, case):
    one, two = _load(runs, 1, case), _load(runs, 2, case)
    assert two["sharded"] and not one["sharded"]
    assert len(one["steps"]) == len(two["steps"]) == 3
    for a, b in zip(one["steps"], two["steps"]):
        kept_a, resp_a, nll_a = a.tolist()
        kept_b, resp_b, nll_b = b.tolist()
        assert (kept_a, resp_a) == (kept_b, resp_b), "the same tokens kept, so the same kept fraction"
        assert nll_b == pytest.approx(nll_a, rel=1e-5), "the same loss (kept tokens' NLL sum) at every step"
    assert _max_diff(one["params"], two["params"]) < 1e-4, "the same weights after 3 steps"
    assert _max_diff(one["history"], two["history"]) < 1e-5, "the same history weights"
    if two["history"]:
        assert two["history_is_local"] and two["local_shapes_match"], "history kept as the parameters' local shards"
    assert one["last_step"] == two["last_step"]


@pytest.mark.parametrize("case", ["lora-reference", "full-reference"])
def test_reference_model_is_sharded_as_the_model(runs, case):
    assert _load(runs, 2, case)["reference_sharded"]


@pytest.mark.parametrize("case", ["lora-ema", "full-base"])
def test_export_under_fsdp2_equals_single_process_export(runs, case):
    from safetensors.torch import load_file

    one = load_file(str(runs[1] / f"{case}-hf" / "model.safetensors"))
    two = load_file(str(runs[2] / f"{case}-hf" / "model.safetensors"))
    assert not any("lora" in k for k in two), "LoRA merged into the exported weights"
    assert _max_diff(one, two) < 1e-4
    assert (runs[2] / f"{case}-hf" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("case", RESUME)
def test_resume_continues_exactly(runs, case):
    result = _load(runs, 2, case)
    assert result["ckpt_is_dir"] == (not case.startswith("resume1file")), "distributed checkpoint: a directory"
    straight, resumed = result["straight"], result["resumed"]
    assert resumed["last_step"] == straight["last_step"] == 3
    assert _max_diff(straight["history"], resumed["history"]) == 0.0, "history shards restored exactly"
    assert _max_diff(straight["params"], resumed["params"]) < 1e-6
    assert resumed["steps"][-1].tolist() == pytest.approx(straight["steps"][-1].tolist(), rel=1e-6)


def test_cli_fsdp2_lora_ema_with_eval_and_export(tmp_path):
    """The CLI with configs/strategies/fsdp2.yaml: answer accuracy before/after (every rank generates, in lockstep),
    a distributed checkpoint holding the history shards, the merged model exported and loadable."""
    args = [
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken_ema.yaml",
        "--config", "configs/strategies/fsdp2.yaml", "--trainer.devices=2", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
        "--model.lora={r: 4, alpha: 8, dropout: 0.0}", "--eval.num_problems=4", "--eval.max_new_tokens=4",
        "--eval.batch_size=2",
    ]
    out = subprocess.run([sys.executable, "-m", "sstoken_pl", *args], cwd=ROOT, env=_env(""), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert "Answer accuracy before training" in log and "Answer accuracy after training" in log
    run = tmp_path / "lightning_logs" / "version_0"
    rows = [json.loads(line) for line in (run / "eval_after.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "output", "gold", "extracted", "correct"} <= set(rows[0])
    assert f"({sum(r['correct'] for r in rows)}/4 held-out problems" in log.split("Answer accuracy after training")[1]
    (ckpt,) = (run / "checkpoints").iterdir()
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(sharding.HISTORY_PREFIX in k and "lora_A" in k for k in keys), "EMA shards in the checkpoint"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    assert not any("lora" in n for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------------------ refused combinations
def _trainer(strategy_name, stage=None):
    cls = type(strategy_name, (), {})
    strategy = cls()
    if stage is not None:
        strategy.config = {"zero_optimization": {"stage": stage}}
    return types.SimpleNamespace(strategy=strategy)


@pytest.mark.parametrize(
    "strategy, stage, needs_weights, refused",
    [
        ("FSDPStrategy", None, True, True),
        ("FSDPStrategy", None, False, False),  # LoRA base: adapters off, no copy
        ("DeepSpeedStrategy", 3, True, True),
        ("DeepSpeedStrategy", 3, False, False),
        ("DeepSpeedStrategy", 2, True, False),
        ("DDPStrategy", None, True, False),
    ],
)
def test_history_weights_refused_where_they_cannot_follow_the_parameters(strategy, stage, needs_weights, refused):
    trainer = _trainer(strategy, stage)
    if refused:
        with pytest.raises(ConfigError, match="HistoryModel"):
            sharding.check_strategy(trainer, "HistoryModel(mode='ema')", needs_weights)
    else:
        sharding.check_strategy(trainer, "HistoryModel(mode='ema')", needs_weights)


def test_step_normalization_refused_under_deepspeed():
    with pytest.raises(ConfigError, match="micro_batch"):
        sharding.check_step_mean_supported(_trainer("DeepSpeedStrategy", 2), "step", "TokenSelection.loss_normalization")
    sharding.check_step_mean_supported(_trainer("DeepSpeedStrategy", 2), "micro_batch", "x")
    sharding.check_step_mean_supported(_trainer("DDPStrategy"), "step", "x")


@pytest.mark.parametrize("strategy, stage", [("FSDPStrategy", None), ("DeepSpeedStrategy", 3)])
def test_export_and_eval_refused_under_fsdp1_and_zero3(strategy, stage):
    with pytest.raises(ConfigError, match="model.export: false"):
        sharding.check_gathering(_trainer(strategy, stage), "model.export", "model.export: false")
    sharding.check_gathering(_trainer("DeepSpeedStrategy", 2), "model.export", "model.export: false")


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp1", "deepspeed_zero2", "deepspeed_zero3"])
def test_strategy_configs_name_lightning_strategies(name):
    import importlib

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "strategies", f"{name}.yaml")))
    strategy = config["trainer"]["strategy"]
    if isinstance(strategy, dict):
        module, _, cls = strategy["class_path"].rpartition(".")
        assert hasattr(importlib.import_module(module), cls)
    if name.startswith("deepspeed"):
        assert config["model"]["loss_normalization"] == "micro_batch"


def test_packed_batches_train_as_padded_ones(runs):
    """The packed case is the ``lora-base`` case (ssToken, base history, attention) on packed rows: the same tokens
    kept, the same losses and weights, on 1 process and (each rank packing its own share) on 2."""
    for devices in (1, 2):
        packed, padded = _load(runs, devices, "lora-packed"), _load(runs, devices, "lora-base")
        for a, b in zip(packed["steps"], padded["steps"]):
            assert a.tolist()[:2] == b.tolist()[:2] and a.tolist()[2] == pytest.approx(b.tolist()[2], rel=1e-5)
        assert _max_diff(packed["params"], padded["params"]) < 1e-5
