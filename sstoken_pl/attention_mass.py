"""ssToken's attention score as pure math: the attention mass each query puts on the prompt keys.

``score[b, i] = mean_h Σ_{j prompt, j ≤ i} softmax_j(q_{b,h,i} · k_{b,h,j} · scaling)``, the softmax over the keys
query ``i`` may attend to (non-padding, causal, inside a sliding window if the layer has one). No model here: the
probe that hands these functions one layer's rotated query and key during the training forward is
``sstoken_pl.attention``.
"""

from __future__ import annotations

import torch

from sstoken_pl.loss import IGNORE_INDEX


def prompt_key_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``BoolTensor[B, T]``: the prompt keys of a batch, non-padding positions whose label is ``-100``."""
    prompt = labels == IGNORE_INDEX
    if attention_mask is not None:
        prompt &= attention_mask.to(device=labels.device, dtype=torch.bool)
    return prompt


def prompt_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    prompt_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    chunk_size: int = 256,
    sliding_window: int | None = None,
    softcap: float | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """``FloatTensor[B, T]`` (float32): the attention mass each query puts on prompt keys, averaged over heads.

    Args:
        query: ``[B, H, T, D]``, as handed to the attention interface (after RoPE).
        key: ``[B, Hkv, T, D]``; with grouped-query attention (``Hkv < H``) query head ``h`` reads key head
            ``h // (H // Hkv)``. Key heads are broadcast, never repeated in memory.
        prompt_mask: ``[B, T]`` bool/int, the prompt keys (padding positions are dropped whatever their value).
        attention_mask: ``[B, T]`` bool/int, 1 on real tokens, 0 on padding (left or right); None: no padding.
        scaling: the factor on ``q · k`` (the attention module's ``scaling``).
        chunk_size: with ``softcap`` only: query positions handled at once (one float32 ``[B, H, chunk_size, T]``
            buffer). Without soft-capping the mass comes from one fused ``scaled_dot_product_attention`` whose values
            are the prompt indicator (``_prompt_mass_sdpa``): no ``[T, T]`` float buffer at all.
        sliding_window: query ``i`` sees keys ``j`` with ``i - sliding_window < j ≤ i`` (as ``transformers``' masks).
        softcap: logit soft-capping ``softcap · tanh(logits / softcap)`` (Gemma-2 style), if the layer uses it.
        segments: ``[B, T]`` int, for packed rows (``sstoken_pl.packing``): a query sees only the keys of its own
            segment (its own sample's prompt), as the packed forward's block-diagonal mask.

    Computed without autograd and without autocast, the softmax in float32. Padding queries get 0.
    """
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"prompt_attention_mass: query/key must be [B, H, T, D], got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    if key.shape != (B, Hkv, T, D) or H % Hkv != 0:
        raise ValueError(
            f"prompt_attention_mass: key {tuple(key.shape)} does not fit query {tuple(query.shape)} "
            f"(same batch, length and head size; query heads a multiple of key heads)"
        )
    if prompt_mask.shape != (B, T) or (attention_mask is not None and attention_mask.shape != (B, T)):
        raise ValueError(
            f"prompt_attention_mass: masks must be [B, T] = {(B, T)}, got prompt_mask {tuple(prompt_mask.shape)} "
            f"and attention_mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"prompt_attention_mass: chunk_size must be ≥ 1, got {chunk_size}")
    n_rep = H // Hkv
    device = query.device
    valid = (
        torch.ones(B, T, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device=device, dtype=torch.bool)
    )
    same = None if segments is None else segments.to(device)[:, :, None] == segments.to(device)[:, None, :]
    if softcap is None:
        return _prompt_mass_sdpa(query, key, prompt_mask, valid, scaling, sliding_window, same)
    prompt = (prompt_mask.to(device=device, dtype=torch.bool) & valid).float()[:, None, None, :, None]
    positions = torch.arange(T, device=device)
    mass = torch.zeros(B, T, dtype=torch.float32, device=device)
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        keys_t = key.float().transpose(-1, -2)  # [B, Hkv, D, T]
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            n = end - start
            # query head h = g·n_rep + r reads key head g: group the query heads by key head, rows (r, i)
            q = query[:, :, start:end].float().reshape(B, Hkv, n_rep * n, D)
            logits = torch.matmul(q, keys_t).mul_(scaling).view(B, Hkv, n_rep, n, T)
            if softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
            q_pos = positions[start:end, None]
            allowed = positions[None, :] <= q_pos
            if sliding_window is not None:
                allowed &= positions[None, :] > q_pos - sliding_window
            allowed = allowed[None] & valid[:, None, :]  # [B, n, T]
            if same is not None:
                allowed = allowed & same[:, start:end]
            logits.masked_fill_(~allowed[:, None, None], float("-inf"))
            # softmax in place: one [B, H, n, T] buffer. A padding query with no visible key gives NaN, zeroed below.
            weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
            on_prompt = torch.matmul(weights, prompt).squeeze(-1) / weights.sum(dim=-1)
            mass[:, start:end] = on_prompt.mean(dim=(1, 2))
    return torch.where(valid, mass, 0.0)


def _prompt_mass_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    prompt_mask: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """``prompt_attention_mass`` through one fused ``scaled_dot_product_attention``: the values are the indicator of
    the prompt keys (in the first of ``D`` value channels, so the kernel is the one the model's attention uses), so
    the output of each query *is* its attention mass on the prompt; the ``[T, T]`` weights are never materialised
    (beyond the boolean mask). float32, no autograd."""
    B, H, T, D = query.shape
    if same is None and _causal_suffices(valid, sliding_window):
        allowed = None  # the kernel's own causal mask: no [B, 1, T, T] mask to build or read
    else:
        positions = torch.arange(T, device=query.device)
        allowed = positions[None, :] <= positions[:, None]  # causal: query i sees keys j ≤ i
        if sliding_window is not None:
            allowed &= positions[None, :] > positions[:, None] - sliding_window
        allowed = allowed[None, None] & valid[:, None, None, :]  # [B, 1, T, T]
        if same is not None:  # packed rows: a query sees its own segment's keys only
            allowed &= same[:, None]
        allowed |= ~valid[:, None, :, None]  # padding queries see everything (no all-masked row); zeroed below
    with torch.no_grad(), torch.autocast(device_type=query.device.type, enabled=False):
        values = torch.zeros(B, key.shape[1], T, D, dtype=torch.float32, device=query.device)
        values[..., 0] = (prompt_mask.to(device=query.device, dtype=torch.bool) & valid).float()[:, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), values, attn_mask=allowed, is_causal=allowed is None, scale=scaling,
            enable_gqa=key.shape[1] != H,
        )
    mass = out[..., 0].mean(dim=1)
    return torch.where(valid, mass, 0.0)


def _causal_suffices(valid: torch.Tensor, sliding_window: int | None) -> bool:
    """Whether the plain causal mask gives every real query exactly the keys it may see: no sliding window and no
    padding before a real token (right padding or none), so no real query can reach a padding key. Decided on CPU
    only, where it costs nothing and the explicit-mask kernel is ~4× slower; on an accelerator the check would be a
    host sync, so the explicit mask stays."""
    if sliding_window is not None or valid.device.type != "cpu":
        return False
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())
