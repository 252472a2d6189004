"""ssToken's attention score: per token, the attention mass its own query puts on the prompt, in one decoder layer.

``score[b, i] = mean_h Σ_{j prompt, j ≤ i} softmax_j(q_{b,h,i} · k_{b,h,j} · scaling)``, the softmax over the
keys query ``i`` may attend to (non-padding, causal, inside the layer's sliding window if it has one). Prompt keys
are the non-padding positions whose label is ``-100``. The result is ``FloatTensor[B, T]`` in [0, 1], aligned with
``labels``, 0 at padding queries.

The score is taken from the *training* forward, which keeps its fast attention (SDPA / flash): the probed layer's
attention module gets its own copy of the model config whose ``_attn_implementation`` names a function registered in
``transformers.AttentionInterface``. That function runs the model's real implementation for the output and, when the
probe is armed, recomputes the softmax rows from the already-rotated query/key under ``torch.no_grad()``, chunked over
query positions. Only that layer is rerouted; the model config, the masks the model builds and every other layer
are untouched, and nothing keeps ``[B, H, T, T]`` attention weights around. The math (``prompt_attention_mass``,
``prompt_key_mask``) is ``sstoken_pl.attention_mass``; it is re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from sstoken_pl.attention_mass import prompt_attention_mass, prompt_key_mask
from sstoken_pl.errors import ConfigError
from sstoken_pl.models import unwrap

#: The name of the probing attention function in ``transformers.AttentionInterface``.
PROBE_IMPLEMENTATION = "sstoken_prompt_probe"
#: The attribute of the probed attention module that holds its ``PromptAttentionProbe``.
PROBE_ATTR = "_sstoken_probe"


def check_layer(layer: Any, what: str) -> int:
    """``layer`` as an int (negative counts from the end), or ``ConfigError``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"{what} must be an integer layer index (negative counts from the end), got {layer!r}")
    return layer


def check_chunk_size(chunk_size: Any, what: str) -> int:
    """``chunk_size`` as a positive int, or ``ConfigError``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"{what} must be a positive integer, got {chunk_size!r}")
    return chunk_size


# ---------------------------------------------------------------------------------------------- model plumbing
def _attention_of(layer: nn.Module) -> nn.Module | None:
    """The self-attention module of a decoder layer: an ``*Attention*`` module with ``layer_idx`` and ``config``."""
    for module in layer.modules():
        if "Attention" in type(module).__name__ and hasattr(module, "layer_idx") and hasattr(module, "config"):
            return module
    return None


def decoder_attentions(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder layer of a Hugging Face causal LM (through a peft wrapper).

    The decoder stack is the ``nn.ModuleList`` whose every element holds an attention module with a ``layer_idx``
    (Llama, Qwen2, Mistral, Gemma and most ``transformers`` decoders); when several lists qualify, the one with
    ``num_hidden_layers`` elements.
    """
    base = unwrap(model)
    stacks: list[tuple[str, list[nn.Module]]] = []
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            attentions = [_attention_of(layer) for layer in module]
            if all(a is not None for a in attentions):
                stacks.append((name, attentions))
    if len(stacks) > 1:
        config = getattr(base, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text_config, "num_hidden_layers", None)
        stacks = [s for s in stacks if len(s[1]) == n_layers] or stacks[:1]
    if not stacks:
        raise ConfigError(
            f"{type(base).__name__}: found no decoder layers (an nn.ModuleList of layers whose attention module has "
            f"`layer_idx` and `config`); the attention score needs a Hugging Face decoder-only model"
        )
    return stacks[0][1]


def _probed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function registered as ``PROBE_IMPLEMENTATION``: only the probed module's config names it."""
    return getattr(module, PROBE_ATTR)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Register ``PROBE_IMPLEMENTATION`` in ``transformers.AttentionInterface`` (once per process).

    The registration stays after ``remove()``: it is a name only a probed module's own config refers to, and a copy
    of a model taken while a probe was installed keeps working.
    """
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(PROBE_IMPLEMENTATION) is not _probed_attention:
        AttentionInterface.register(PROBE_IMPLEMENTATION, _probed_attention)


class PromptAttentionProbe:
    """Captures ``prompt_attention_mass`` from one decoder layer during one forward of a Hugging Face causal LM.

    Usage::

        probe = PromptAttentionProbe.install(model, layer=-1)   # once; model may be a peft PeftModel
        probe.arm(prompt_key_mask(labels, attention_mask), attention_mask)
        logits = model(input_ids=ids, attention_mask=attention_mask).logits   # the training forward, fast attention
        scores = probe.take()                                   # FloatTensor[B, T]
        probe.remove()

    The probe is one-shot: armed, it captures during the next forward whose batch has the armed ``[B, T]`` shape,
    then disarms itself, so a later forward of the same step (a history-model forward, a recomputation under gradient
    checkpointing) leaves the capture alone. Disarmed, the probed layer only forwards to the model's attention.
    """

    def __init__(self, attention: nn.Module, layer_index: int, chunk_size: int) -> None:
        """Use ``PromptAttentionProbe.install``."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._functions = ALL_ATTENTION_FUNCTIONS
        self._attention = attention
        self.layer_index = layer_index
        self.chunk_size = chunk_size
        # The model's config (shared by all layers) and the probed module's own copy that routes it to the probe.
        self._config = attention.config
        self._probe_config = copy.copy(attention.config)
        # the internal attribute: the `_attn_implementation` setter would also rename the (shared) sub-configs
        self._probe_config._attn_implementation_internal = PROBE_IMPLEMENTATION
        self._eager: Callable | None = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
        self._armed: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._scores: torch.Tensor | None = None
        self._installed = False

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def install(cls, model: nn.Module, layer: int = -1, chunk_size: int = 256) -> PromptAttentionProbe:
        """Probe decoder layer ``layer`` (negative: from the end) of ``model``; returns the installed probe.

        Raises ``ConfigError`` for a bad ``layer``/``chunk_size`` or a model without recognisable decoder layers, and
        ``RuntimeError`` if that layer already carries a probe.
        """
        check_layer(layer, "PromptAttentionProbe.layer")
        check_chunk_size(chunk_size, "PromptAttentionProbe.chunk_size")
        attentions = decoder_attentions(model)
        n = len(attentions)
        if not -n <= layer < n:
            raise ConfigError(f"attention layer {layer} is out of range: the model has {n} decoder layers")
        index = layer % n
        attention = attentions[index]
        if getattr(attention, PROBE_ATTR, None) is not None:
            raise RuntimeError(f"decoder layer {index} already carries a PromptAttentionProbe; remove() it first")
        _register()
        probe = cls(attention, index, chunk_size)
        setattr(attention, PROBE_ATTR, probe)
        attention.config = probe._probe_config
        probe._installed = True
        return probe

    def remove(self) -> None:
        """Give the layer back its original config and drop the probe attribute (idempotent).

        A capture not yet taken stays available to ``take()``.
        """
        if not self._installed:
            return
        self._attention.config = self._config
        if getattr(self._attention, PROBE_ATTR, None) is self:
            delattr(self._attention, PROBE_ATTR)
        self._armed = None
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    # ------------------------------------------------------------------ capture
    def arm(
        self, prompt_mask: torch.Tensor, attention_mask: torch.Tensor | None = None, segments: torch.Tensor | None = None
    ) -> None:
        """Capture during the next forward over a ``[B, T]`` batch with these prompt keys and padding mask (and, for
        packed rows, ``segments``: ``prompt_attention_mass``).

        Drops any earlier capture not yet taken.
        """
        if not self._installed:
            raise RuntimeError("PromptAttentionProbe.arm: the probe is not installed (or was removed)")
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_mask, dtype=torch.bool)
        if prompt_mask.dim() != 2 or attention_mask.shape != prompt_mask.shape:
            raise ValueError(
                f"PromptAttentionProbe.arm: prompt_mask {tuple(prompt_mask.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} must both be [B, T]"
            )
        self._armed = (prompt_mask.detach(), attention_mask.detach(), segments)
        self._scores = None

    def disarm(self) -> None:
        """Cancel a pending capture and drop a capture not yet taken."""
        self._armed = None
        self._scores = None

    @property
    def armed(self) -> bool:
        return self._armed is not None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block, forwards through the layer are not captured and leave the probe armed as it was (for
        another model's forward through the same layers: a history model with adapters off or other weights)."""
        armed, self._armed = self._armed, None
        try:
            yield
        finally:
            self._armed = armed

    def take(self) -> torch.Tensor:
        """The captured ``FloatTensor[B, T]`` (float32); clears it. ``RuntimeError`` if nothing was captured."""
        scores, self._scores = self._scores, None
        if scores is None:
            state = "was armed but" if self._armed is not None else "was not armed, or"
            raise RuntimeError(
                f"PromptAttentionProbe: no attention scores captured: the probe {state} the forward did not run "
                f"through decoder layer {self.layer_index} ({type(self._attention).__name__}) with the armed batch "
                f"shape. Arm before the training forward; the model's attention must dispatch through "
                f"transformers' AttentionInterface."
            )
        return scores

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probed layer's attention: the model's own implementation, plus the capture when armed."""
        # The model's implementation sees the module exactly as without the probe (flash attention reads
        # `module.config._attn_implementation` to pick its kernel).
        module.config = self._config
        try:
            attend = self._implementation()
            output = attend(module, query, key, value, attention_mask, **kwargs)
        finally:
            module.config = self._probe_config
        if self._armed is not None and self._matches(query, key):
            prompt_mask, padding_mask, segments = self._armed
            self._armed = None
            scaling = kwargs.get("scaling")
            self._scores = prompt_attention_mass(
                query.detach(),
                key.detach(),
                prompt_mask,
                padding_mask,
                scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
                chunk_size=self.chunk_size,
                sliding_window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
                segments=segments,
            )
        return output

    def _implementation(self) -> Callable:
        """The model's attention function, looked up at call time (follows a later ``set_attn_implementation``)."""
        name = self._config._attn_implementation
        attend = self._functions.get_interface(name, self._eager)
        if attend is None:
            raise RuntimeError(
                f"{type(self._attention).__name__}: no `eager_attention_forward` in {type(self._attention).__module__} "
                f"for attn_implementation={name!r}"
            )
        return attend

    def _matches(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        """Whether this forward is over the armed batch (same B and T, no cached keys)."""
        B, T = self._armed[0].shape
        return query.shape[0] == B and query.shape[2] == T and key.shape[2] == T


@contextlib.contextmanager
def prompt_attention(
    model: nn.Module, batch: Mapping[str, torch.Tensor], layer: int = -1, chunk_size: int = 256
) -> Iterator[PromptAttentionProbe]:
    """Within the block, the next forward of ``model`` over ``batch`` captures its prompt attention mass.

    For inspection tools::

        with prompt_attention(model, batch, layer=-1) as probe:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        scores = probe.take()   # FloatTensor[B, T], aligned with batch["labels"]

    ``batch`` needs ``labels`` (``-100`` on the prompt) and may have ``attention_mask``.
    """
    probe = PromptAttentionProbe.install(model, layer=layer, chunk_size=chunk_size)
    try:
        attention_mask = batch.get("attention_mask")
        probe.arm(prompt_key_mask(batch["labels"], attention_mask), attention_mask)
        yield probe
    finally:
        probe.remove()
