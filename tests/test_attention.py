"""The attention score: the probe against eager attention's weights, its side effects, the AttentionScore callback."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import sstoken_pl
from sstoken_pl.attention import (
    PROBE_ATTR,
    PromptAttentionProbe,
    decoder_attentions,
    prompt_attention,
    prompt_attention_mass,
    prompt_key_mask,
)
from sstoken_pl.callbacks import AttentionScore
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll, response_mask
from sstoken_pl.models import load_causal_lm, tiny_llama_config

# Qwen2 with grouped-query attention; layers 1 and 2 use a 4-token sliding window (layer 0 is full attention).
QWEN2 = dict(
    model_type="qwen2",
    vocab_size=261,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    use_sliding_window=True,
    sliding_window=4,
    max_window_layers=1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
CONFIGS = {"llama": tiny_llama_config(), "qwen2": QWEN2}


def padded_batch(padding="right", seed=0, batch_size=3, seq_len=14, prompts=(5, 3, 7), lengths=(14, 9, 11)):
    """A batch of prompt + response samples of different lengths, padded on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    attn = torch.zeros(batch_size, seq_len, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), -100)
    for b, (prompt, length) in enumerate(zip(prompts, lengths)):
        start = 0 if padding == "right" else seq_len - length
        real = slice(start, start + length)
        ids[b, real] = torch.randint(5, 261, (length,), generator=g)
        attn[b, real] = 1
        labels[b, start + prompt : start + length] = ids[b, start + prompt : start + length]
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.fixture(scope="module")
def models():
    """Per architecture: an sdpa model and an eager copy with the same weights."""
    out = {}
    for name, cfg in CONFIGS.items():
        model = load_causal_lm(config=cfg, seed=0).eval()
        eager = load_causal_lm(config=cfg, seed=1, attn_implementation="eager").eval()
        eager.load_state_dict(model.state_dict())
        out[name] = (model, eager)
    return out


def eager_reference(eager, batch, layer):
    """Attention mass on prompt keys from eager attention's own weights (``output_attentions=True``)."""
    with torch.no_grad():
        weights = eager(**inputs(batch), output_attentions=True).attentions[layer]  # [B, H, T, T]
    prompt = prompt_key_mask(batch["labels"], batch["attention_mask"])
    return (weights * prompt[:, None, None, :]).sum(-1).mean(1)


# ---------------------------------------------------------------------------------------------- the quantity
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_probe_matches_eager_attention_weights(models, arch, padding, layer):
    model, eager = models[arch]
    batch = padded_batch(padding)
    with torch.no_grad():
        plain = model(**inputs(batch)).logits
        with prompt_attention(model, batch, layer=layer, chunk_size=5) as probe:
            probed = model(**inputs(batch)).logits
    scores = probe.take()
    valid = batch["attention_mask"].bool()

    assert scores.shape == batch["labels"].shape and scores.dtype == torch.float32
    torch.testing.assert_close(scores[valid], eager_reference(eager, batch, layer)[valid], atol=1e-5, rtol=0)
    assert torch.all(scores[~valid] == 0)
    assert torch.equal(probed, plain)  # the probe does not change the output


def naive_prompt_mass(query, key, prompt, attn, scaling, sliding_window=None, softcap=None):
    """Full-matrix reference: repeated key heads, additive mask, float32 softmax."""
    H, Hkv, T = query.shape[1], key.shape[1], query.shape[2]
    k = key.repeat_interleave(H // Hkv, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < sliding_window) if sliding_window else True)
    allowed = allowed[None, None] & attn.bool()[:, None, None, :]
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    mass = (weights * (prompt & attn.bool())[:, None, None, :]).sum(-1).mean(1)
    return torch.where(attn.bool(), mass, 0.0)


@pytest.mark.parametrize("sliding_window,softcap", [(None, None), (3, None), (None, 2.0)])
def test_pure_function_gqa_chunking_window_softcap(sliding_window, softcap):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 6, 2, 11, 8
    query, key = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    batch = padded_batch("left", batch_size=2, seq_len=T, prompts=(4, 2), lengths=(11, 8))
    prompt, attn = prompt_key_mask(batch["labels"], batch["attention_mask"]), batch["attention_mask"]
    expected = naive_prompt_mass(query, key, prompt, attn, 0.3, sliding_window, softcap)
    for chunk in (1, 4, T, 100):
        got = prompt_attention_mass(query, key, prompt, attn, 0.3, chunk, sliding_window, softcap)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # bfloat16 inputs, under autocast: still computed in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = prompt_attention_mass(query.bfloat16(), key.bfloat16(), prompt, attn, 0.3, 4, sliding_window, softcap)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        prompt_attention_mass(query, key[:, :, :5], prompt, attn, 0.3)


@pytest.mark.parametrize("padding", ["right", "none", "left"])
def test_causal_fast_path_only_where_it_is_exact(padding, monkeypatch):
    # Right padding or none: the kernel's causal mask replaces the explicit one (same numbers); left padding keeps
    # the explicit mask (a causal mask would let real queries see the padding keys before them).
    from sstoken_pl import attention_mass as attn_mod

    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, D = 2, 4, 2, 12, 8
    query, key = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    if padding == "none":
        batch = padded_batch("right", batch_size=2, seq_len=T, prompts=(4, 3), lengths=(12, 12))
    else:
        batch = padded_batch(padding, batch_size=2, seq_len=T, prompts=(4, 3), lengths=(12, 7))
    prompt, attn = prompt_key_mask(batch["labels"], batch["attention_mask"]), batch["attention_mask"]
    used = []
    real = attn_mod._causal_suffices
    monkeypatch.setattr(attn_mod, "_causal_suffices", lambda *a: used.append(real(*a)) or used[-1])
    got = prompt_attention_mass(query, key, prompt, attn, 0.3)
    assert used == [padding != "left"]
    torch.testing.assert_close(got, naive_prompt_mass(query, key, prompt, attn, 0.3), atol=1e-6, rtol=0)
    assert attn_mod._causal_suffices(attn.bool(), 5) is False  # a sliding window needs the explicit mask


# ---------------------------------------------------------------------------------------------- side effects
def test_probe_touches_only_its_layer_and_is_removed_cleanly(models):
    model, _ = models["llama"]
    batch = padded_batch()
    with torch.no_grad():
        before = model(**inputs(batch), output_hidden_states=True).hidden_states
    probe = PromptAttentionProbe.install(model, layer=-1, chunk_size=4)
    attentions = decoder_attentions(model)
    assert model.config._attn_implementation == "sdpa"  # the model-wide setting (and its masks) are unchanged
    assert attentions[0].config is model.config and attentions[1].config is not model.config
    with pytest.raises(RuntimeError, match="already carries"):
        PromptAttentionProbe.install(model, layer=1)
    probe.arm(prompt_key_mask(batch["labels"], batch["attention_mask"]), batch["attention_mask"])
    with torch.no_grad():
        during = model(**inputs(batch), output_hidden_states=True).hidden_states
    assert probe.take().shape == (3, 14)
    probe.remove()
    probe.remove()  # idempotent
    assert all(torch.equal(a, b) for a, b in zip(before, during))
    assert all(a.config is model.config and not hasattr(a, PROBE_ATTR) for a in attentions)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="out of range"):
        PromptAttentionProbe.install(model, layer=2)
    with pytest.raises(ConfigError, match="positive integer"):
        PromptAttentionProbe.install(model, chunk_size=0)


def test_probe_is_one_shot(models):
    model, _ = models["llama"]
    first, second = padded_batch(seed=0), padded_batch(seed=1)
    with torch.no_grad():
        with prompt_attention(model, first) as reference:
            model(**inputs(first))
        expected = reference.take()
        probe = PromptAttentionProbe.install(model)
        try:
            probe.arm(prompt_key_mask(first["labels"], first["attention_mask"]), first["attention_mask"])
            model(input_ids=first["input_ids"][:2])  # another batch shape: not captured, still armed
            assert probe.armed
            model(**inputs(first))  # captured; the probe disarms itself
            assert not probe.armed
            model(**inputs(second))  # a later forward (e.g. the history model's) leaves the capture alone
            torch.testing.assert_close(probe.take(), expected, atol=0, rtol=0)
            with pytest.raises(RuntimeError, match="did not run through decoder layer 1"):
                probe.take()
        finally:
            probe.remove()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_flow_with_activation_checkpointing(models, reentrant):
    model, _ = models["llama"]
    model = copy.deepcopy(model).train()
    batch = padded_batch()
    with torch.no_grad(), prompt_attention(model, batch) as reference:
        model(**inputs(batch))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    decoder_attentions(model)[-1].register_forward_hook(lambda *args: calls.append(1))
    with prompt_attention(model, batch) as probe:
        logits = model(**inputs(batch)).logits
        loss = (per_token_nll(logits, batch["labels"]) * response_mask(batch["labels"])).sum()
        loss.backward()  # recomputes the layers: the probe, already disarmed, captures nothing new
    assert len(calls) == 2  # the forward and its recomputation both ran through the probed layer
    scores = probe.take()
    assert not scores.requires_grad
    torch.testing.assert_close(scores, reference.take(), atol=1e-6, rtol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_through_peft_lora(models):
    peft = pytest.importorskip("peft")
    model, _ = models["qwen2"]
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # adapters that change the attention pattern
    batch = padded_batch("left")
    lora.train()
    with prompt_attention(lora, batch, layer=-1, chunk_size=3) as probe:
        loss = per_token_nll(lora(**inputs(batch)).logits, batch["labels"]).sum()
        loss.backward()
    scores = probe.take()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)

    merged = copy.deepcopy(lora).merge_and_unload().eval()
    merged.set_attn_implementation("eager")
    valid = batch["attention_mask"].bool()
    base_scores = eager_reference(models["qwen2"][1], batch, -1)
    torch.testing.assert_close(scores[valid], eager_reference(merged, batch, -1)[valid], atol=1e-5, rtol=0)
    assert not torch.allclose(scores[valid], base_scores[valid], atol=1e-3)  # the adapters are seen


# ---------------------------------------------------------------------------------------------- the callback
class TinySFT(pl.LightningModule):
    """A user's module: builds its HF model in ``configure_model``, trains with ``sstoken_pl.token_loss``."""

    def __init__(self, attr="model"):
        super().__init__()
        self.attr = attr
        self.seen = []

    def configure_model(self):
        if not hasattr(self, self.attr):
            setattr(self, self.attr, load_causal_lm(config=tiny_llama_config(), seed=0))

    def training_step(self, batch, batch_idx):
        model = getattr(self, self.attr)
        logits = model(**inputs(batch)).logits
        scorer = next(cb for cb in self.trainer.callbacks if isinstance(cb, AttentionScore))
        scores = scorer.scores(self, batch)
        assert scorer.scores(self, batch) is scores  # cached for the batch
        self.seen.append((batch, scores))
        return sstoken_pl.token_loss(self, batch, logits)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module, callback, batches):
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def test_attention_score_callback_in_training():
    module = TinySFT()
    fit(module, AttentionScore(layer=-1, chunk_size=4), [padded_batch("right", seed=0), padded_batch("left", seed=1)])
    assert len(module.seen) == 2
    for batch, scores in module.seen:
        valid = batch["attention_mask"].bool()
        assert scores.shape == batch["labels"].shape and scores.dtype == torch.float32
        assert torch.all((scores >= 0) & (scores <= 1 + 1e-6)) and torch.all(scores[~valid] == 0)
        # a query inside the prompt sees only prompt keys: all its mass is on the prompt
        in_prompt = prompt_key_mask(batch["labels"], batch["attention_mask"])
        torch.testing.assert_close(scores[in_prompt], torch.ones_like(scores[in_prompt]))
        assert torch.all(scores[valid & ~in_prompt] < 1)
    # removed at teardown
    assert all(not hasattr(a, PROBE_ATTR) and a.config is module.model.config for a in decoder_attentions(module.model))


def test_attention_score_arguments_and_checkpoint_state():
    for kwargs in (dict(layer="last"), dict(layer=True), dict(chunk_size=0), dict(chunk_size=2.5), dict(model_attr="")):
        with pytest.raises(ConfigError):
            AttentionScore(**kwargs)
    with pytest.raises(ConfigError, match="TinySFT.net"):
        fit(TinySFT(attr="model"), AttentionScore(model_attr="net"), [padded_batch()])
    with pytest.raises(ConfigError, match="out of range"):
        fit(TinySFT(), AttentionScore(layer=5), [padded_batch()])

    callback = AttentionScore(layer=0, chunk_size=8)
    assert callback.state_dict() == {"layer": 0, "chunk_size": 8}
    AttentionScore(layer=0, chunk_size=64).load_state_dict(callback.state_dict())  # chunk size: memory only
    with pytest.warns(UserWarning, match="attention layer 0"):
        AttentionScore(layer=-1).load_state_dict(callback.state_dict())
    with pytest.raises(RuntimeError, match="no probe installed"):
        callback.scores(TinySFT(), padded_batch())
