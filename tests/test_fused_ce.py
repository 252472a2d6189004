"""The fused linear cross-entropy (``model.fused_cross_entropy``): the LM head and the NLL in one pass that never holds
the ``[N, V]`` logits, equal to the logits path in value and gradient."""

import copy
import importlib.util

import pytest
import torch

from sstoken_pl import row_nll as row_nll_mod
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import HeadRows, per_token_nll, response_mask, token_loss
from sstoken_pl.models import fused_head_problem, load_causal_lm, response_logits, tiny_llama_config
from sstoken_pl.module import LoRA, SFTModule
from tests.helpers import random_batches, trainer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [None, 7 * 50])  # one chunk; chunks of 7 rows (N = 40 → 6 chunks)
def test_chunked_linear_nll_equals_logits(bias, chunk_elements, monkeypatch):
    if chunk_elements is not None:
        monkeypatch.setattr(row_nll_mod, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    N, H, V = 40, 16, 50
    labels = torch.full((4, 12), -100)
    labels[:, 2:12] = torch.randint(0, V, (4, 10), generator=g)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    upstream = torch.rand(4, 12, generator=g, dtype=torch.float32)

    results = []
    for fused in (False, True):
        logits_or_rows = HeadRows(hidden, weight, b) if fused else torch.nn.functional.linear(hidden, weight, b)
        nll, entropy = per_token_nll(logits_or_rows, labels, with_entropy=True)
        params = [hidden, weight] + ([b] if bias else [])
        grads = torch.autograd.grad((nll * upstream).sum(), params)
        results.append((nll.detach(), entropy, grads))
    (n0, e0, g0), (n1, e1, g1) = results
    torch.testing.assert_close(n1, n0)
    torch.testing.assert_close(e1, e0)
    assert (n1[~response_mask(labels)] == 0).all() and (n1[response_mask(labels)] > 0).all()
    for a, c in zip(g0, g1):
        assert c.dtype == a.dtype
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)  # both paths take the NLL in float32


def test_chunked_linear_nll_never_holds_the_logits(monkeypatch):
    # The autograd graph keeps the hidden rows, the head and per-row log-sum-exps only: nothing of N × V.
    monkeypatch.setattr(row_nll_mod, "_CHUNK_ELEMENTS", 8 * 1000)
    N, H, V = 64, 8, 1000
    labels = torch.randint(0, V, (2, 33))
    labels[:, 0] = -100
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll = per_token_nll(HeadRows(hidden, weight), labels)
    assert saved and max(t.numel() for t in saved) < N * V
    nll.sum().backward()
    assert hidden.grad is not None and weight.grad is None  # a frozen head gets no gradient


@pytest.mark.parametrize("lora", [False, True])
def test_fused_token_loss_equals_logits_path(tiny_llama, lora):
    # Through a real model: response_logits(fused="chunked") → token_loss gives the loss and the gradients of the
    # logits path, for full fine-tuning (head trained too) and for LoRA (head frozen).
    model = copy.deepcopy(tiny_llama).double()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = random_batches(1)[0]
    module = torch.nn.Module()  # token_loss outside a trainer: plain mean NLL of the response tokens
    results = []
    for fused in (None, "chunked"):
        out = response_logits(model, batch, fused=fused)
        assert isinstance(out, HeadRows) == (fused is not None)
        loss = token_loss(module, batch, out)
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert any("lm_head" in n for n in g0) != lora
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)
    # the head is back in place after the call
    assert model.get_output_embeddings()(torch.zeros(1, 64, dtype=torch.float64)).shape[-1] == 261


def test_models_that_cannot_fuse_are_named(tiny_llama):
    from peft import LoraConfig, get_peft_model

    assert fused_head_problem(tiny_llama) is None
    gemma = load_causal_lm(
        config=dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0),
        seed=0, attn_implementation="eager",
    )
    assert "after the LM head" in fused_head_problem(gemma)
    lora_head = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not a plain nn.Linear" in fused_head_problem(lora_head)
    with pytest.raises(ConfigError, match="fused_cross_entropy=chunked.*after the LM head"):
        response_logits(gemma, random_batches(1, vocab=64)[0], fused="chunked")


def test_bad_fused_cross_entropy_settings(monkeypatch):
    with pytest.raises(ConfigError, match="model.fused_cross_entropy must be null or one of"):
        SFTModule(model_config=tiny_llama_config(), tokenizer="byte", fused_cross_entropy="flash")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install 'liger-kernel>=0.8.2'"):
        SFTModule(model_config=tiny_llama_config(), tokenizer="byte", fused_cross_entropy="liger")


def test_kernels_fall_back_to_chunked_off_cuda():
    # liger/cce are CUDA kernels: on a CPU the same HeadRows go through the chunked path (same numbers)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 30, (2, 9))
    labels[:, :3] = -100
    hidden, weight = torch.randn(12, 8, generator=g), torch.randn(30, 8, generator=g)
    ref = per_token_nll(HeadRows(hidden, weight, impl="chunked"), labels)
    for impl in ("liger", "cce"):
        torch.testing.assert_close(per_token_nll(HeadRows(hidden, weight, impl=impl), labels), ref)


@pytest.mark.skipif(importlib.util.find_spec("cut_cross_entropy") is None, reason="cut-cross-entropy not installed")
def test_cce_call_matches_chunked(monkeypatch):
    # The call into Cut Cross-Entropy (argument order, reduction="none", row alignment, gradients), checked on a CPU
    # with the library's pure-PyTorch implementation; its CUDA kernel is the same call with impl="cce".
    monkeypatch.setattr(row_nll_mod, "_KERNEL_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(row_nll_mod, "_CCE_IMPL", "torch_compile")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 40, (3, 10))
    labels[:, :4] = -100
    hidden = torch.randn(18, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    out = []
    for impl in ("chunked", "cce"):
        nll = per_token_nll(HeadRows(hidden, weight, impl=impl), labels)
        (grad,) = torch.autograd.grad((nll * torch.arange(30.0).view(3, 10)).sum(), hidden)
        out.append((nll.detach(), grad))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-4, rtol=1e-4)


def test_fit_with_fused_cross_entropy_trains_like_the_logits_path(tmp_path):
    # The same 3 steps of ssToken selection with LoRA, logits path vs fused chunked: same losses, same weights.
    from sstoken_pl.callbacks import AttentionScore, HistoryModel, TokenSelection
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.synthetic import SyntheticTask

    runs = []
    for fused in (None, "chunked"):
        torch.manual_seed(0)
        module = SFTModule(model_config=tiny_llama_config(eos_token_id=4), tokenizer="byte-chat", lr=3e-3,
                           lora=LoRA(r=4, alpha=8, dropout=0.0), export=False, fused_cross_entropy=fused)
        data = SFTDataModule(batch_size=4, max_length=256, synthetic=SyntheticTask(num_train=16, num_val=8))
        callbacks = [HistoryModel(), AttentionScore(), TokenSelection(ratio=0.6, gamma=0.5)]
        t = trainer(max_steps=3, default_root_dir=tmp_path / str(fused), callbacks=callbacks, limit_val_batches=1,
                    val_check_interval=3)
        t.fit(module, datamodule=data)
        runs.append((float(t.callback_metrics["train/loss"]), float(t.callback_metrics["val/loss"]),
                     {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4)
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-4)
    for n, p in runs[0][2].items():
        torch.testing.assert_close(runs[1][2][n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_chunked_linear_nll_under_autocast_runs_the_head_in_the_autocast_dtype():
    # Under bf16 autocast nn.Linear runs in bfloat16; the fused head does the same (and its gradients keep the
    # inputs' dtypes), so the two paths agree to bfloat16 precision.
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 64, (2, 17))
    labels[:, :5] = -100
    hidden = torch.randn(24, 32, generator=g, requires_grad=True)
    weight = torch.randn(64, 32, generator=g, requires_grad=True)
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for rows in (torch.nn.functional.linear(hidden, weight), HeadRows(hidden, weight)):
            if not isinstance(rows, HeadRows):
                assert rows.dtype == torch.bfloat16
            nll = per_token_nll(rows, labels)
            gh, gw = torch.autograd.grad(nll.sum(), [hidden, weight])
            out.append((nll.detach(), gh, gw))
    assert out[1][1].dtype == hidden.dtype and out[1][2].dtype == weight.dtype
    for a, b in zip(out[0], out[1]):
        torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.02)
    exact = per_token_nll(torch.nn.functional.linear(hidden, weight), labels).detach()
    assert (out[1][0] - exact).abs().max() > 0  # the head did run in bfloat16, not float32


@pytest.mark.parametrize("strategy, stage", [("ModelParallelStrategy", None), ("FSDPStrategy", None), ("DeepSpeedStrategy", 3)])
def test_fused_cross_entropy_refused_where_the_head_is_sharded(strategy, stage, tiny_llama):
    import types

    from lightning.pytorch.strategies import ModelParallelStrategy

    from sstoken_pl import sharding

    cls = ModelParallelStrategy if strategy == "ModelParallelStrategy" else type(strategy, (), {})
    instance = cls.__new__(cls)
    if stage is not None:
        instance.config = {"zero_optimization": {"stage": stage}}
    fake = types.SimpleNamespace(strategy=instance)
    with pytest.raises(ConfigError, match="fused_cross_entropy=chunked reads the LM head's weight outside its module"):
        sharding.check_whole_parameters(fake, tiny_llama, "model.fused_cross_entropy=chunked", "model.fused_cross_entropy: null")
    zero2 = type("DeepSpeedStrategy", (), {})()
    zero2.config = {"zero_optimization": {"stage": 2}}
    sharding.check_whole_parameters(types.SimpleNamespace(strategy=zero2), tiny_llama, "x", "y")  # whole parameters
