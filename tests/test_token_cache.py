"""Per-sample caching of a fixed model's per-token NLL (base history, reference) across epochs."""

import copy

import pytest
import torch

from sstoken_pl.callbacks import HistoryModel, ReferenceModel, TokenSelection
from sstoken_pl.loss import response_mask
from sstoken_pl.models import load_causal_lm, tiny_llama_config
from sstoken_pl.token_cache import SampleCache
from tests.helpers import ForeignModule, loader, random_batches, trainer


def test_values_come_back_by_response_position_whatever_the_padding():
    right = random_batches(1, batch_size=3, seed=1)[0]
    values = torch.rand(right["labels"].shape) * response_mask(right["labels"])
    cache = SampleCache()
    missing, keys = cache.get(right, response_mask(right["labels"]))
    assert missing is None and cache.misses == 1
    cache.put(keys, response_mask(right["labels"]), values)
    # the same samples, left-padded and in another order
    order = [2, 0, 1]
    left = {}
    for k in ("input_ids", "attention_mask", "labels"):
        rows = []
        for b in order:
            n = int(right["attention_mask"][b].sum())
            pad = right[k].shape[1] - n
            fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}[k]
            rows.append(torch.cat([torch.full((pad,), fill, dtype=right[k].dtype), right[k][b, :n]]))
        left[k] = torch.stack(rows)
    left["index"] = right["index"][order]
    got, _ = cache.get(left, response_mask(left["labels"]))
    assert got is not None and cache.hits == 1
    for i, b in enumerate(order):
        torch.testing.assert_close(got[i][response_mask(left["labels"])[i]], values[b][response_mask(right["labels"])[b]])
    assert (got[~response_mask(left["labels"])] == 0).all()


def test_changed_tokens_or_missing_index_are_misses():
    batch = random_batches(1, seed=2)[0]
    cache = SampleCache()
    _, keys = cache.get(batch, response_mask(batch["labels"]))
    cache.put(keys, response_mask(batch["labels"]), torch.ones(batch["labels"].shape))
    changed = copy.deepcopy(batch)
    changed["input_ids"][0, 1] += 1  # e.g. another tokenizer or template: another fingerprint
    assert cache.get(changed, response_mask(changed["labels"]))[0] is None
    no_index = {k: v for k, v in batch.items() if k != "index"}
    assert cache.get(no_index, response_mask(batch["labels"])) == (None, None)


@pytest.mark.parametrize("lora", [False, True])
def test_base_history_cache_skips_later_epochs_and_trains_identically(lora, monkeypatch):
    import sstoken_pl.callbacks.history as history_module

    forwards = []
    real = history_module.response_logits
    monkeypatch.setattr(history_module, "response_logits", lambda *a, **k: forwards.append(1) or real(*a, **k))
    batches = random_batches(3)
    finals, counts = [], []
    for cache in (False, True):
        model = load_causal_lm(config=tiny_llama_config(), seed=0)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
        forwards.clear()
        history = HistoryModel(mode="base", cache=cache)
        selection = TokenSelection(method="sstoken", ratio=0.5, gamma=1.0)
        torch.manual_seed(0)
        trainer(max_epochs=3, max_steps=-1, callbacks=[history, selection]).fit(ForeignModule(model, lr=0.1), loader(batches))
        finals.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
        counts.append(len(forwards))
    assert counts == [9, 3]  # 3 epochs × 3 batches without the cache; the first epoch only with it
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_reference_cache_is_per_fit(tmp_path, byte_tok):
    reference = load_causal_lm(config=tiny_llama_config(), seed=3)
    reference.save_pretrained(tmp_path / "ref")
    byte_tok.save_pretrained(tmp_path / "ref")
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    ref = ReferenceModel(path=str(tmp_path / "ref"))
    selection = TokenSelection(method="rho1", ratio=0.5)
    trainer(max_epochs=2, max_steps=-1, callbacks=[ref, selection]).fit(ForeignModule(model), loader(random_batches(2)))


@pytest.mark.parametrize("cache", [False, True])
def test_attention_is_captured_from_the_training_forward_not_the_history_prefetch(cache, monkeypatch):
    # TokenSelection runs the history forward at batch start, through the same layers as the training forward;
    # the attention probe (armed by AttentionScore, listed first) must capture only the training forward.
    import sstoken_pl.attention as attention_module
    from sstoken_pl.callbacks import AttentionScore

    grad_enabled = []
    real = attention_module.prompt_attention_mass
    monkeypatch.setattr(
        attention_module, "prompt_attention_mass", lambda *a, **k: grad_enabled.append(torch.is_grad_enabled()) or real(*a, **k)
    )
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    callbacks = [AttentionScore(layer=-1), HistoryModel(mode="base", cache=cache), TokenSelection(method="sstoken", ratio=0.5)]
    trainer(max_epochs=2, max_steps=-1, callbacks=callbacks).fit(ForeignModule(model, lr=0.1), loader(random_batches(2)))
    assert grad_enabled == [True] * 4  # one capture per training batch, each in the training forward
