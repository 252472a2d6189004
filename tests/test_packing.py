"""Packed batches (``data.packing``): the layout, the forward of several architectures, and every method trains on
packed batches exactly as on padded ones."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sstoken_pl import packing
from sstoken_pl.callbacks import TokenSelection
from sstoken_pl.data import SFTCollator
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll
from sstoken_pl.models import load_causal_lm, response_logits, tiny_llama_config
from tests.test_cli import ROOT
from tests.test_method_configs import METHODS, local_method_config, reference  # noqa: F401 (the fixture)


def _samples(lengths, vocab=261, seed=0, prompt=0.4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        k = max(1, int(n * prompt))
        out.append({"input_ids": ids, "labels": [-100] * k + ids[k:], "index": 10 + i,
                    "noise": [int(j % 3 == 0) for j in range(n)], "token_weights": [1.0 + (j % 2) for j in range(n)]})
    return out


# ---------------------------------------------------------------------------------------------------- the layout
def test_best_fit_decreasing_places_each_sample_once_within_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    rows = packing.best_fit_decreasing(lengths, 12)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    # longest first, each into the fullest row it fits: 9 | 8 | 7 | 6, then 5 → 7's row (room 5), 4 → 8's (room 4),
    # 3 → 9's (room 3), 2 → 6's (room 6, the only one left with room)
    assert rows == [[1, 2], [5, 6], [3, 0], [7, 4]]
    assert packing.best_fit_decreasing(lengths, 12) == rows  # a function of the lengths
    with pytest.raises(ValueError, match="more than a row"):
        packing.best_fit_decreasing([13], 12)


def test_pack_keeps_every_token_and_restarts_positions():
    samples = _samples([30, 12, 50, 7, 25])
    batch = SFTCollator(0, pack_length=64)(samples)
    padded = SFTCollator(0)(samples)
    for key in ("input_ids", "attention_mask", "labels", "index", "noise", "token_weights"):
        assert torch.equal(batch[key], padded[key]), key  # the samples view is the padded batch
    rows = batch["packed"]
    assert tuple(rows["input_ids"].shape) == (2, 62)  # 124 tokens: 50 + 12 and 30 + 25 + 7
    back = packing.to_samples(rows["input_ids"], batch)
    assert torch.equal(back, padded["input_ids"] * padded["attention_mask"])
    assert torch.equal(packing.to_rows(padded["input_ids"], batch), rows["input_ids"])
    where = rows["where"]
    for i, s in enumerate(samples):  # each sample's positions count 0, 1, … in the rows
        assert rows["position_ids"].view(-1)[where[i, : len(s["input_ids"])]].tolist() == list(range(len(s["input_ids"])))
    seg = packing.segments(rows["position_ids"])
    assert int(seg.max()) + 1 >= 2


def test_padding_share():
    assert packing.padding_share([10, 10, 10, 10], 2) == 0.0
    assert packing.padding_share([10, 30, 20, 20], 2) == pytest.approx(1 - 80 / 100)


# ---------------------------------------------------------------------------------------------------- the forward
ARCHITECTURES = {
    "llama": tiny_llama_config(initializer_range=0.5),
    "qwen2": dict(model_type="qwen2", vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5),
    "qwen3": dict(model_type="qwen3", vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.5),
    "mistral": dict(model_type="mistral", vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5),
    "gemma": dict(model_type="gemma", vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.5),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_packed_forward_gives_each_sample_its_own_nll(arch, attn):
    """Each sample's per-token NLL from the packed rows equals the one it has alone (batch of one, no padding) to
    1e-5 (plus float32 rounding of NLLs near 10: init 0.5 makes the samples differ enough that attention across
    them would show by far more)."""
    model = load_causal_lm(config=ARCHITECTURES[arch], attn_implementation=attn, seed=0).eval()
    samples = _samples([30, 12, 50, 7, 25])
    batch = SFTCollator(0, pack_length=64)(samples)
    with torch.no_grad():
        packed = per_token_nll(response_logits(model, batch), batch["labels"])
        for i, s in enumerate(samples):
            alone = SFTCollator(0)([s])
            nll = per_token_nll(response_logits(model, alone), alone["labels"])[0]
            n = len(s["input_ids"])
            torch.testing.assert_close(packed[i, :n], nll, atol=1e-5, rtol=2e-6)
        packing.check_model(model)  # the fit-start check agrees


class _Leaky(torch.nn.Module):
    """A model that drops ``position_ids`` (positions 0…T−1 over the whole row, one causal mask): what an
    architecture without the packed-sequence mask does."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_model_that_attends_across_samples_is_refused():
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    with pytest.raises(ConfigError, match="attends across packed samples"):
        packing.check_model(_Leaky(model))


# ---------------------------------------------------------------------------------------------------- every method
class _Record(Callback):
    def __init__(self):
        self.losses, self.kept = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, method, reference_run, packed, name):
    from sstoken_pl.cli import SSTokenCLI
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    method_config = local_method_config(method, reference_run, tmp_path)
    args = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--config", str(method_config),
            f"--trainer.default_root_dir={tmp_path / name}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--model.export=false", "--data.synthetic.num_train=16", "--data.synthetic.label_noise=0.3",
            "--data.max_length=1024", f"--data.packing={str(packed).lower()}"]  # 8 samples of ~230 tokens: 2 rows
    cli = SSTokenCLI(SFTModule, SFTDataModule, args=args, run=False, save_config_callback=None)
    record = _Record()
    cli.trainer.callbacks.append(record)
    selector = next((cb for cb in cli.trainer.callbacks if isinstance(cb, TokenSelection)), None)
    if selector is not None:
        select = selector.select

        def spy(pl_module, batch, inputs, resp):
            kept = select(pl_module, batch, inputs, resp)
            record.kept.append(kept.detach().clone())
            return kept

        selector.select = spy
    cli.trainer.fit(cli.model, cli.datamodule)
    if packed:  # several samples per row, or this would test nothing
        batch = next(iter(cli.datamodule.train_dataloader()))
        assert batch["packed"]["input_ids"].shape[0] * 3 <= batch["input_ids"].shape[0]
    return record, cli


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_packed_as_unpacked(method, reference, tmp_path):  # noqa: F811 (the fixture)
    """Two steps of each shipped method with and without packing: the same tokens kept in each sample (same seed)
    and the same losses to 1e-5 (the second after an optimizer step, so the gradients agree too)."""
    padded, _ = _fit(tmp_path, method, reference, False, "padded")
    packed, cli = _fit(tmp_path, method, reference, True, "packed")
    assert cli.datamodule.packing
    assert len(packed.losses) == len(padded.losses) == 2
    for a, b in zip(packed.losses, padded.losses):
        assert a == pytest.approx(b, abs=1e-5)
    assert len(packed.kept) == len(padded.kept)
    for a, b in zip(packed.kept, padded.kept):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:  # the weights rule
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
