"""Token-level objectives (DFT, probability, EAFT, OTR, ASFT): each against its formula in float64, composed with a
selection rule, and through a trainer (``token_loss``'s ``Σ c·d·ℓ / Σ c``)."""

import math

import pytest
import torch

from sstoken_pl import objectives
from sstoken_pl.callbacks import HistoryModel, TokenSelection
from sstoken_pl.errors import ConfigError
from sstoken_pl.loss import per_token_nll, response_mask
from sstoken_pl.methods import METHODS, Method
from sstoken_pl.models import load_causal_lm, tiny_llama_config
from tests.helpers import ForeignModule, loader, random_batches, trainer

V = 50


def case(seed=0, B=3, T=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=dtype) * 2).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    return logits, labels


def reference(logits, labels):
    """log p of every vocabulary entry at each response position, and the positions: the plain formula."""
    resp = response_mask(labels)
    logq = torch.log_softmax(logits[:, :-1], dim=-1)[resp[:, 1:]]  # [N, V]
    return logq, labels[resp], resp


def inputs_of(logits, labels):
    resp = response_mask(labels)
    nll = per_token_nll(logits, labels)
    return {"nll": nll, "logits": logits[:, :-1][resp[:, 1:]], "targets": labels[resp]}, resp


def grad_of(loss, logits):
    (g,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    return g


def test_dft_is_the_detached_probability_times_nll():
    logits, labels = case()
    inputs, resp = inputs_of(logits, labels)
    loss, stats = objectives.dft_loss(inputs, resp, {})
    logq, y, _ = reference(logits, labels)
    logp = logq.gather(1, y[:, None]).squeeze(1)
    expected = -(logp.exp().detach() * logp)
    assert torch.allclose(loss[resp].double(), expected, atol=1e-6)
    # the gradient is p·∇NLL, not ∇(p·NLL): the weight carries no gradient
    assert torch.allclose(grad_of(loss[resp], logits), grad_of(expected, logits), atol=1e-6)
    assert not torch.allclose(grad_of(loss[resp], logits), grad_of(-(logp.exp() * logp), logits), atol=1e-4)
    assert math.isclose(float(stats["weight_mean"]), float(logp.exp().mean()), rel_tol=1e-5)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 10.0])
def test_prob_objective_family(power):
    logits, labels = case(1)
    inputs, resp = inputs_of(logits, labels)
    loss, stats, keep = objectives.prob_loss(inputs, resp, {"power": power, "min_p": 0.0, "max_p": 1.0})
    logq, y, _ = reference(logits, labels)
    p = logq.gather(1, y[:, None]).squeeze(1).exp()
    expected = -torch.log(p) if power == 0 else (1 - p**power) / power
    assert torch.allclose(loss[resp].double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad_of(loss[resp], logits), grad_of(expected, logits), rtol=1e-4, atol=1e-7)
    assert torch.equal(keep, resp)


def test_prob_thresholds_count_only_the_tokens_in_range():
    logits, labels = case(2)
    inputs, resp = inputs_of(logits, labels)
    p = torch.exp(-inputs["nll"].detach())
    lo = float(p[resp].median())
    _, stats, keep = objectives.prob_loss(inputs, resp, {"power": 1.0, "min_p": lo, "max_p": 1.0})
    assert torch.equal(keep, resp & (p >= lo)) and 0 < keep.sum() < resp.sum()
    _, _, low = objectives.prob_loss(inputs, resp, {"power": 1.0, "min_p": 0.0, "max_p": lo})
    assert torch.equal(low, resp & (p <= lo))


@pytest.mark.parametrize("k,normalizer,alpha", [(20, 3.0, 1.0), (5, 1.0, 2.0)])
def test_eaft_weight_is_the_normalised_top_k_entropy(k, normalizer, alpha):
    logits, labels = case(3)
    inputs, resp = inputs_of(logits, labels)
    loss, stats = objectives.eaft_loss(inputs, resp, {"k": k, "normalizer": normalizer, "alpha": alpha})
    logq, y, _ = reference(logits, labels)
    top = torch.topk(logits[:, :-1][resp[:, 1:]], k, dim=-1).values
    q = torch.softmax(top, dim=-1)
    weight = ((-(q * q.log()).sum(-1)) / normalizer) ** alpha
    nll = -logq.gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(loss[resp].double(), (weight * nll).detach(), rtol=1e-5)
    assert torch.allclose(grad_of(loss[resp], logits), grad_of(weight.detach() * nll, logits), rtol=1e-4, atol=1e-8)


def test_asft_is_dft_plus_the_kl_from_the_anchor():
    logits, labels = case(4)
    inputs, resp = inputs_of(logits, labels)
    g = torch.Generator().manual_seed(9)
    anchor = torch.randn(inputs["logits"].shape, generator=g, dtype=torch.float64)
    loss, stats = objectives.asft_loss({**inputs, "history_logits": anchor}, resp, {"alpha": 0.3})
    logq, y, _ = reference(logits, labels)
    logp = logq.gather(1, y[:, None]).squeeze(1)
    loga = torch.log_softmax(anchor, dim=-1)
    kl = (loga.exp() * (loga - logq)).sum(-1)  # KL(anchor ‖ θ), as F.kl_div(log π_θ, π_anchor).sum(-1)
    expected = -(logp.exp().detach() * logp) + 0.3 * kl
    assert torch.allclose(loss[resp].double(), expected, rtol=1e-5)
    assert torch.allclose(grad_of(loss[resp], logits), grad_of(expected, logits), rtol=1e-4, atol=1e-7)
    assert math.isclose(float(stats["kl"]), float(kl.mean()), rel_tol=1e-5)
    # the KL is 0 at the anchor, and chunking does not change it
    same = objectives.row_kl(anchor.clone().requires_grad_(), anchor)
    assert float(same.abs().max()) < 1e-6


def test_otr_draws_follow_the_policy_and_its_loss_has_the_expected_value():
    """With K large and τ = 1 the loss approaches −p·log p − β Σ_{a≠y} π(a) log π(a) (the expectation over draws)."""
    logits, labels = case(5, B=2, T=6)
    logits = (logits.detach() / 3).requires_grad_()  # a spread-out policy: the ground truth is drawn often enough
    inputs, resp = inputs_of(logits, labels)
    inputs["draw_keys"] = torch.arange(resp.numel()).view(resp.shape) * 7919
    beta = -0.25
    loss, stats = objectives.otr_loss(inputs, resp, {"samples": 20000, "temperature": 1.0, "penalty": beta})
    logq, y, _ = reference(logits, labels)
    q = logq.exp()
    hit = torch.nn.functional.one_hot(y, V).bool()
    expected = -(torch.where(hit, 1.0, beta) * q * logq).sum(-1)
    assert torch.allclose(loss[resp].double(), expected.detach(), rtol=0.05, atol=0.02)
    assert math.isclose(float(stats["sampled_gt"]), float(q[hit].mean()), rel_tol=0.05)


def test_otr_temperature_and_keys():
    logits, labels = case(6)
    inputs, resp = inputs_of(logits, labels)
    inputs["draw_keys"] = torch.arange(resp.numel()).view(resp.shape)
    opts = {"samples": 64, "temperature": 1e-4, "penalty": -0.1}
    _, cold = objectives.otr_loss(inputs, resp, opts)
    argmax_is_gt = (inputs["logits"].argmax(-1) == inputs["targets"]).double().mean()
    assert math.isclose(float(cold["sampled_gt"]), float(argmax_is_gt), abs_tol=1e-9), "τ → 0 draws the argmax"
    a, _ = objectives.otr_loss(inputs, resp, {**opts, "temperature": 1.5})
    b, _ = objectives.otr_loss(inputs, resp, {**opts, "temperature": 1.5})
    assert torch.equal(a, b), "the draws depend on the keys only"
    inputs["draw_keys"] = inputs["draw_keys"] + 1
    c, _ = objectives.otr_loss(inputs, resp, {**opts, "temperature": 1.5})
    assert not torch.equal(a, c)


def test_keyed_uniforms_are_uniform_and_independent_of_order():
    keys = torch.arange(4000) * 3 + 11
    u = objectives.keyed_uniform(keys, 8)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    perm = torch.randperm(4000)
    assert torch.equal(objectives.keyed_uniform(keys[perm], 8), u[perm])


# ------------------------------------------------------------------------------------------- options and configs
@pytest.mark.parametrize("objective,options,match", [
    ("dft", {"alpha": 1}, "not options of objective 'dft'"),
    ("prob", {"min_p": 1.5}, "min_p must be in"),
    ("eaft", {"k": 1}, "k must be an integer"),
    ("eaft", {"normalizer": 0}, "normalizer must be >"),
    ("otr", {"temperature": 0}, "temperature must be >"),
    ("otr", {"samples": 2.5}, "samples must be an integer"),
    ("asft", {"alpha": float("nan")}, "alpha must be a finite"),
])
def test_bad_objective_options(objective, options, match):
    with pytest.raises(ConfigError, match=match):
        TokenSelection(method=objective, objective_options=options)


def test_unknown_objective():
    with pytest.raises(ConfigError, match="unknown objective 'dtf'"):
        TokenSelection(method="sstoken", objective="dtf")


# ------------------------------------------------------------------------------------------- through a trainer
HARD = Method("hard_tokens_objective_test", lambda o: frozenset({"nll"}), lambda i, r, o, g: torch.where(r, i["nll"], 0.0))


class Recorder(ForeignModule):
    """Records each training batch's loss and the NLL of the model before the step."""

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.seen = (batch, logits.detach().double())
        import sstoken_pl

        loss = sstoken_pl.token_loss(self, batch, logits)
        self.losses.append(float(loss))
        return loss


def first_loss(callbacks, batch):
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    module = Recorder(model, lr=0.0)
    module.losses = []
    trainer(max_steps=1, callbacks=callbacks).fit(module, train_dataloaders=loader([batch]))
    return module.losses[0], module.seen


def test_dft_through_a_trainer_divides_by_the_token_count():
    (batch,) = random_batches(1, batch_size=4, seed=1)
    loss, (_, logits) = first_loss([TokenSelection(method="dft")], batch)
    nll = per_token_nll(logits, batch["labels"])
    resp = response_mask(batch["labels"])
    expected = (torch.exp(-nll) * nll)[resp].sum() / resp.sum()
    assert math.isclose(loss, float(expected), rel_tol=1e-5)


def test_composition_selects_then_applies_the_objective():
    """A selection rule with DFT's loss: Σ_kept p·NLL / N_kept (the ρ share of each sample with the highest NLL)."""
    METHODS.setdefault(HARD.name, HARD)
    (batch,) = random_batches(1, batch_size=4, seed=2)
    loss, (_, logits) = first_loss([TokenSelection(method=HARD.name, ratio=0.5, objective="dft")], batch)
    nll = per_token_nll(logits, batch["labels"])
    resp = response_mask(batch["labels"])
    from sstoken_pl.selection import top_ratio_mask

    kept = top_ratio_mask(torch.where(resp, nll, 0.0), resp, 0.5, None)
    expected = (torch.exp(-nll) * nll)[kept].sum() / kept.sum()
    assert math.isclose(loss, float(expected), rel_tol=1e-5)
    plain, _ = first_loss([TokenSelection(method=HARD.name, ratio=0.5)], batch)
    assert math.isclose(plain, float(nll[kept].mean()), rel_tol=1e-5)


def test_data_weights_scale_each_token_and_the_normaliser_counts_tokens():
    (batch,) = random_batches(1, batch_size=4, seed=3)
    resp = response_mask(batch["labels"])
    weights = torch.where(resp, torch.arange(batch["labels"].numel()).view(resp.shape) % 3 * 0.5, 0.0)
    weighted = {**batch, "token_weights": weights.float()}
    for callbacks in ([], [TokenSelection(method="dft")]):
        loss, (_, logits) = first_loss(callbacks, weighted)
        nll = per_token_nll(logits, batch["labels"])
        per_token = nll if not callbacks else torch.exp(-nll) * nll
        expected = (per_token * weights)[resp].sum() / resp.sum()
        assert math.isclose(loss, float(expected), rel_tol=1e-5), callbacks


def test_objectives_that_need_logits_refuse_a_fused_cross_entropy(tmp_path):
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule
    from sstoken_pl.tokenizer import byte_tokenizer

    module = SFTModule(model_config=tiny_llama_config(), tokenizer="byte", fused_cross_entropy="chunked", export=False)
    dm = SFTDataModule(tokenizer=byte_tokenizer(), batch_size=2, synthetic={"num_train": 8, "num_val": 2})
    t = trainer(max_steps=1, callbacks=[TokenSelection(method="eaft")], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="objective 'eaft' needs the response rows of logits.*fused_cross_entropy"):
        t.fit(module, dm)


def test_asft_with_a_base_history_trains_and_logs_the_kl(tmp_path):
    (batch,) = random_batches(1, batch_size=4, seed=4)
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    module = ForeignModule(model, lr=0.5)
    logged = {}

    class Keep(HistoryModel):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    trainer(max_steps=3, callbacks=[Keep(mode="base"), TokenSelection(method="asft", objective_options={"alpha": 1.0})]).fit(
        module, train_dataloaders=loader([batch] * 3)
    )
    assert "objective/kl" in logged and logged["objective/kl"] > 0, "after two steps the model has left its anchor"


def test_asft_without_a_history_model_says_what_to_add():
    (batch,) = random_batches(1, batch_size=2, seed=4)
    model = load_causal_lm(config=tiny_llama_config(), seed=0)
    with pytest.raises(ConfigError, match="HistoryModel \\(for history_logits\\)"):
        trainer(max_steps=1, callbacks=[TokenSelection(method="asft")]).fit(ForeignModule(model), loader([batch]))


def _focal(inputs, resp, options, generator):
    p = torch.exp(-inputs["nll"].detach())
    return (1 - p) ** options["gamma"] * inputs["nll"], {"weight_mean": (1 - p)[resp].mean()}


FOCAL = objectives.Objective("focal_test", loss=_focal, options={"gamma": 2.0})


def test_an_objective_of_your_own_by_dotted_path():
    (batch,) = random_batches(1, batch_size=4, seed=5)
    selection = TokenSelection(method="random", ratio=1.0, objective="tests.test_objectives:FOCAL",
                               objective_options={"gamma": 1.0})
    loss, (_, logits) = first_loss([selection], batch)
    nll = per_token_nll(logits, batch["labels"])
    resp = response_mask(batch["labels"])
    assert math.isclose(loss, float(((1 - torch.exp(-nll)) * nll)[resp].mean()), rel_tol=1e-5)
    with pytest.raises(ConfigError, match="is a function, not a sstoken_pl Objective"):
        TokenSelection(objective="tests.test_objectives:_focal")


def _weighted_records(path, n=24):
    import json

    with open(path, "w") as f:
        for i in range(n):
            record = {"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                                   {"role": "assistant", "content": f"{i} + {i} = {2 * i}", "weight": 1 + i % 3},
                                   {"role": "user", "content": "sure?"},
                                   {"role": "assistant", "content": "yes", "weight": 0 if i % 2 else 0.5}],
                      "weight": 2.0 if i % 4 == 0 else 1.0}
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_dft_and_data_weights_on_the_fused_path_train_like_the_logits_path(tmp_path):
    """Weights are never silently dropped by a fused cross-entropy: the same 3 steps, same losses, same weights."""
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    path = _weighted_records(tmp_path / "w.jsonl")
    runs = []
    for fused in (None, "chunked"):
        torch.manual_seed(0)
        module = SFTModule(model_config=tiny_llama_config(eos_token_id=4), tokenizer="byte-chat", lr=3e-3,
                           export=False, fused_cross_entropy=fused)
        data = SFTDataModule(path=path, batch_size=4, val_size=0.0, max_length=256)
        t = trainer(max_steps=3, default_root_dir=tmp_path / str(fused), callbacks=[TokenSelection(method="dft")])
        t.fit(module, datamodule=data)
        runs.append((float(t.callback_metrics["train/loss"]), {n: p.detach().clone() for n, p in module.model.named_parameters()}))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4)
    for n, p in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_weighted_data_and_an_objective_from_the_cli(tmp_path):
    from tests.test_cli import cli

    path = _weighted_records(tmp_path / "w.jsonl")
    out = cli("fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/eaft.yaml", f"--data.path={path}",
              "--data.val_size=0.25", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", "--model.export=false")
    assert out.returncode == 0, out.stderr[-3000:]
    import csv
    import glob

    (metrics,) = glob.glob(str(tmp_path / "lightning_logs" / "*" / "metrics.csv"))
    rows = list(csv.DictReader(open(metrics)))
    weights = [float(r["objective/weight_mean"]) for r in rows if r.get("objective/weight_mean")]
    assert len(weights) == 2 and all(0 < w < 2 for w in weights), "EAFT's mean weight is logged every step"
