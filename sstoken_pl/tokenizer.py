"""Tokenizer loading, including a built-in byte-level tokenizer for tiny random-init models (no files needed)."""

from __future__ import annotations

from functools import lru_cache

BYTE_TOKENIZER = "byte"
BYTE_CHAT_TOKENIZER = "byte-chat"

# A ChatML template, the same shape SmolLM2/Qwen use, for the byte tokenizer's chat variant.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=4)
def _byte_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|im_end|>" if chat else "<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def byte_tokenizer(chat: bool = False):
    """A 261-token byte-level tokenizer (5 specials + 256 bytes); ``chat=True`` adds a ChatML chat template.

    Used by ``configs/tiny.yaml`` and the tests: it needs no files, so tiny models run anywhere.
    A fresh copy is returned each call (callers may set attributes such as ``padding_side``).
    """
    import copy

    return copy.deepcopy(_byte_tokenizer(chat))


def load_tokenizer(source: str | None, gguf_file: str | None = None):
    """Load a tokenizer: ``"byte"``/``"byte-chat"`` (built-in), a local directory, a hub name, or a GGUF file."""
    from transformers import AutoTokenizer

    from sstoken_pl.errors import ConfigError

    if source in (BYTE_TOKENIZER, BYTE_CHAT_TOKENIZER):
        tok = byte_tokenizer(chat=source == BYTE_CHAT_TOKENIZER)
    elif source is None:
        raise ConfigError("no tokenizer given: set `model.tokenizer` (or `model.model_name_or_path`, whose tokenizer is used)")
    else:
        from sstoken_pl.models import resolve_source

        path = resolve_source(source)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if not gguf_file:
            from sstoken_pl.hub import offline_kwargs

            kwargs.update(offline_kwargs(path, f"the tokenizer {source!r}"))
        try:
            tok = AutoTokenizer.from_pretrained(path, **kwargs)
        except OSError as err:
            raise ConfigError(f"could not load the tokenizer from {source!r}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
