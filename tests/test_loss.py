import copy

import pytest
import torch
import torch.nn.functional as F

import sstoken_pl
from sstoken_pl.loss import per_token_nll, response_mask
from tests.helpers import ForeignModule, loader, random_batches, trainer


def reference_nll(logits, labels):
    B, T, V = logits.shape
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none")
    return torch.cat([torch.zeros(B, 1), ref.view(B, T - 1)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_per_token_nll_matches_cross_entropy(dtype, chunk):
    torch.manual_seed(0)
    B, T, V = 3, 17, 50
    logits = torch.randn(B, T, V, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :6] = -100
    labels[2] = -100  # a sample with nothing to predict
    nll = per_token_nll(logits, labels, chunk_size=chunk)
    assert nll.dtype == torch.float32 and nll.shape == (B, T)
    weights = torch.randn(B, T)
    weights[1, 2:13] = 0  # dropped tokens: chunks with no gradient are skipped in backward
    (nll * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref = reference_nll(logits, labels)
    (ref * weights).sum().backward()
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), logits.grad.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    assert grad.dtype == dtype
    assert (nll[labels == -100] == 0).all()


@pytest.mark.parametrize("rows", [False, True])
def test_per_token_nll_saves_no_float32_copy_of_logits(rows):
    # What autograd keeps for backward: the response rows of the logits in their own dtype and vectors, nothing
    # else of size N*V (no float32 copy).
    B, T, V = 2, 64, 1000
    labels = torch.randint(0, V, (B, T))
    labels[:, :10] = -100
    N = int(response_mask(labels).sum())
    shape = (N, V) if rows else (B, T, V)
    logits = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_token_nll(logits, labels).sum()
    big = [t for t in saved if t.numel() >= N * V]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].shape == (N, V)


@pytest.mark.parametrize("lora", [False, True])
def test_row_logits_equal_full_logits(tiny_llama, lora):
    # The LM head at response rows only (logits_to_keep=prediction_mask) gives the same NLL, entropy and gradients
    # as the full [B, T, V] logits, for a plain and a peft-wrapped model.
    from sstoken_pl.loss import prediction_mask
    from sstoken_pl.models import response_logits, supports_row_logits

    model = tiny_llama
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    batch = random_batches(1)[0]
    assert supports_row_logits(model)
    rows = response_logits(model, batch)
    assert rows.shape == (int(response_mask(batch["labels"]).sum()), model.config.vocab_size)
    assert rows.shape[0] == int(prediction_mask(batch["labels"]).sum())
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    grads = []
    for logits in (rows, full):
        nll, entropy = per_token_nll(logits, batch["labels"], with_entropy=True)
        model.zero_grad()
        (nll * torch.linspace(0, 1, nll.numel()).view_as(nll)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if logits is rows:
            first = (nll.detach(), entropy)
    torch.testing.assert_close(first[0], nll.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[1], entropy, atol=1e-5, rtol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_row_logits_must_match_labels():
    labels = torch.randint(0, 10, (2, 6))
    with pytest.raises(ValueError, match="rows of logits"):
        per_token_nll(torch.randn(3, 10), labels)


def test_response_mask_aligned_with_labels():
    labels = torch.tensor([[5, -100, 7, 8, -100], [-100, -100, 3, 4, 5]])
    assert response_mask(labels).tolist() == [[False, False, True, True, False], [False, False, True, True, True]]


def test_token_loss_without_selection_is_mean_response_nll(tiny_llama):
    batch = random_batches(1)[0]
    module = ForeignModule(tiny_llama)
    logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sstoken_pl.token_loss(module, batch, logits)
    ref = reference_nll(logits.detach(), batch["labels"])
    mask = response_mask(batch["labels"])
    torch.testing.assert_close(loss.detach(), ref[mask].mean(), atol=1e-5, rtol=1e-5)


def test_token_loss_without_response_tokens_is_zero_not_nan(tiny_llama):
    batch = random_batches(1)[0]
    batch["labels"][:] = -100
    logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sstoken_pl.token_loss(ForeignModule(tiny_llama), batch, logits)
    assert loss.item() == 0.0
    loss.backward()  # still has a graph


def test_token_loss_in_training_without_selection_callback(tiny_llama):
    batches = random_batches(3)
    module = ForeignModule(tiny_llama)
    before = [p.detach().clone() for p in tiny_llama.parameters()]
    trainer(max_steps=3).fit(module, train_dataloaders=loader(batches))
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_llama.parameters()))
