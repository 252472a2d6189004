"""Per-row NLL kernels behind ``sstoken_pl.loss.per_token_nll``: from row logits ``[N, V]`` (chunked, one float32
chunk alive at a time) or from ``HeadRows`` (a fused linear cross-entropy that never holds the ``[N, V]`` logits:
chunked PyTorch, Liger-Kernel or Cut Cross-Entropy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Rows of logits turned into float32 at once: bounds the extra memory of the loss to ~256 MiB whatever B, T, V.
_CHUNK_ELEMENTS = 1 << 26


class _RowNLL(torch.autograd.Function):
    """Per-row NLL (and optionally entropy) of ``logits [N, V]`` against ``targets [N]``, chunked over rows: never
    more than one float32 chunk of logits alive at once, no Python loop over samples, no host sync.

    Forward keeps only the per-row log-sum-exp; backward recomputes the softmax chunk by chunk and writes the
    gradient into one tensor of the logits' shape and dtype (the one the LM head needs anyway).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int, with_entropy: bool):
        N = logits.shape[0]
        nll = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(N, dtype=torch.float32, device=logits.device) if with_entropy else None
        for s in range(0, N, chunk):
            x = logits[s : s + chunk].float()
            lse_c = torch.logsumexp(x, dim=-1)
            nll[s : s + chunk] = lse_c - x.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            lse[s : s + chunk] = lse_c
            if entropy is not None:  # H = lse − Σ p·x, from the same float32 chunk (x may alias logits)
                entropy[s : s + chunk] = lse_c - ((x - lse_c[:, None]).exp() * x).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        if entropy is None:
            return nll
        ctx.mark_non_differentiable(entropy)
        return nll, entropy

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor, grad_entropy: torch.Tensor | None = None):
        logits, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_nll[s : s + chunk].float()
            p = (logits[s : s + chunk].float() - lse[s : s + chunk, None]).exp_()
            p.scatter_add_(-1, targets[s : s + chunk, None], torch.full_like(g[:, None], -1.0))
            grad[s : s + chunk] = p.mul_(g[:, None])
        return grad, None, None, None


FUSED_CROSS_ENTROPY = ("chunked", "liger", "cce")


@dataclass
class HeadRows:
    """The lazy form of row logits: the final hidden states at the rows that predict a response token, ``[N, H]``,
    and the LM head (``weight [V, H]``, ``bias [V]`` or None). ``per_token_nll`` / ``token_loss`` take it in place
    of logits and compute the NLL with a *fused linear cross-entropy* that never holds the ``[N, V]`` logits:

    - ``chunked``: pure PyTorch, any device: the head and the NLL chunk by chunk of rows, recomputed in backward
      (one more head matmul per step; the logits and their gradient never exist whole).
    - ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` (≥ 0.8.2: per-token
      gradients right from that version), Triton on CUDA.
    - ``cce``: Apple's Cut Cross-Entropy ``linear_cross_entropy(reduction="none")``, Triton on CUDA (its default
      ``filter_eps`` skips gradient terms below bfloat16 resolution).

    ``liger`` and ``cce`` fall back to ``chunked`` on other devices, when the head has a bias (``cce``), and when
    the entropy is asked for (Q-Tuning): the chunked pass gives it at no extra cost. Made by
    ``sstoken_pl.response_logits(model, batch, fused=...)``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    impl: str = "chunked"

    def __post_init__(self) -> None:
        if self.impl not in FUSED_CROSS_ENTROPY:
            raise ValueError(f"HeadRows.impl must be one of {FUSED_CROSS_ENTROPY}, got {self.impl!r}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device


def _head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM head runs in: autocast's when it is on (as ``nn.Linear`` would), else the inputs'."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearRowNLL(torch.autograd.Function):
    """Per-row NLL (and optionally entropy) of ``hidden @ weight.T + bias`` against ``targets``, chunked over rows:
    neither the logits nor their gradient exist whole. Backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, with_entropy: bool):
        dtype = _head_dtype(hidden, weight)
        N = hidden.shape[0]
        nll = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(N, dtype=torch.float32, device=hidden.device) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, N, chunk):
                x = torch.nn.functional.linear(hidden[s : s + chunk].to(dtype), w, b).float()
                lse_c = torch.logsumexp(x, dim=-1)
                nll[s : s + chunk] = lse_c - x.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
                lse[s : s + chunk] = lse_c
                if entropy is not None:
                    entropy[s : s + chunk] = lse_c - ((x - lse_c[:, None]).exp() * x).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        if entropy is None:
            return nll
        ctx.mark_non_differentiable(entropy)
        return nll, entropy

    @staticmethod
    def backward(ctx, grad_nll, grad_entropy=None):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                p = (torch.nn.functional.linear(h, w, b).float() - lse[s : s + chunk, None]).exp_()
                p.scatter_add_(-1, targets[s : s + chunk, None], torch.full_like(p[:, :1], -1.0))
                g = p.mul_(grad_nll[s : s + chunk, None].float())  # d NLL / d logits, float32
                if need_h:
                    grad_h[s : s + chunk] = (g.to(dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), h.float())
                if need_b:
                    grad_b += g.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


# Overridable by tests (the CCE library's pure-PyTorch ``torch_compile`` implementation runs on a CPU).
_KERNEL_DEVICES = ("cuda",)
_CCE_IMPL = "cce"


def _fused_row_nll(rows: HeadRows, targets: torch.Tensor, with_entropy: bool):
    impl = rows.impl
    if with_entropy or rows.device.type not in _KERNEL_DEVICES or (impl == "cce" and rows.bias is not None):
        impl = "chunked"
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="none")(rows.weight, rows.hidden, targets, rows.bias).float()
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(rows.hidden, rows.weight, targets, reduction="none", impl=_CCE_IMPL).float()
    chunk = max(1, _CHUNK_ELEMENTS // max(1, rows.weight.shape[0]))
    return _LinearRowNLL.apply(rows.hidden.contiguous(), rows.weight, rows.bias, targets, chunk, with_entropy)


# the library each kernel needs: (module, pip requirement)
_KERNEL_PACKAGES = {"liger": ("liger_kernel", "liger-kernel>=0.8.2"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}


def check_fused_cross_entropy(value: Optional[str], key: str) -> Optional[str]:
    """``None`` (the LM head's logits at response rows) or one of ``FUSED_CROSS_ENTROPY``; the library of a kernel
    must be installed."""
    import importlib.util

    from sstoken_pl.errors import ConfigError

    if value is None:
        return None
    if value not in FUSED_CROSS_ENTROPY:
        raise ConfigError(f"{key} must be null or one of {list(FUSED_CROSS_ENTROPY)}, got {value!r}")
    module, package = _KERNEL_PACKAGES.get(value, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}: {value} needs `pip install '{package}'` (or use chunked, which needs nothing)")
    return value


def row_nll(logits: torch.Tensor | HeadRows, targets: torch.Tensor, with_entropy: bool, chunk_size: int | None = None):
    """``FloatTensor[N]``: the NLL of ``targets [N]`` under the rows ``logits [N, V]`` (or ``HeadRows``), and with
    ``with_entropy`` also each row's predictive entropy (not differentiable)."""
    if isinstance(logits, HeadRows):
        return _fused_row_nll(logits, targets, with_entropy)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return _RowNLL.apply(logits.contiguous(), targets, chunk_size, with_entropy)
