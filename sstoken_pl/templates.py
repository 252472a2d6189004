"""Chat messages to token ids and labels: the tokenizer's chat template, or a plain instruction template.

A sample is a list of chat messages ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``; only
the assistant turns are trained on. Labels follow the Hugging Face convention: ``labels[i] = input_ids[i]`` on
trained tokens, ``-100`` elsewhere.

**Chat template** (``tokenizer.chat_template`` is set): the messages are rendered with
``tokenizer.apply_chat_template``. An assistant turn's trained span runs from the end of the rendering of the
messages before it with ``add_generation_prompt=True`` to the end of the rendering through it: its content and the
end-of-turn token the template emits (``<|im_end|>``; whitespace after that token is not trained). When a template
does not render prefixes as prefixes of the whole conversation (some rewrite earlier turns), the turn's content is
looked up in the full rendering instead — after the previous message's content and before the next one's, verbatim or
without its ``<think>…</think>`` part (as Qwen3/R1-style templates render earlier turns) — followed by the EOS token
when the template puts it there; a turn that cannot be found that way is refused. A template with
``{% generation %}`` markers labels exactly what they mark (``return_assistant_tokens_mask``).

**Plain template** (no chat template)::

    [BOS]{system}\\n\\n                     (only with a system message)
    ### Instruction:\\n{user}\\n\\n          (each user turn)
    ### Response:\\n{assistant}{EOS}        (each assistant turn; {assistant}{EOS} is trained)

so a single-turn sample is ``"### Instruction:\\n{prompt}\\n\\n### Response:\\n" + completion + EOS``.

The rendered text is tokenised as a whole when every span boundary falls on a token boundary of the whole, and
piece by piece (each span separately) otherwise. A BOS token is put first when the tokenizer adds one to plain
text and the rendering does not already start with it (no double BOS).
"""

from __future__ import annotations

from typing import Any, Optional

from sstoken_pl.errors import DataError
from sstoken_pl.loss import IGNORE_INDEX

PLAIN_SYSTEM = "{content}\n\n"
PLAIN_INSTRUCTION = "### Instruction:\n{content}\n\n"
PLAIN_RESPONSE = "### Response:\n"
# The prompt of a single-turn sample under the plain template; the completion and EOS follow it.
PLAIN_TEMPLATE = PLAIN_INSTRUCTION.format(content="{prompt}") + PLAIN_RESPONSE

ROLES = ("system", "user", "assistant")

Messages = list[dict[str, Any]]
# Rendered text split into consecutive pieces, each with its training weight (0: not trained).
_Pieces = list[tuple[str, float]]


def _weight(message: dict[str, Any]) -> float:
    """An assistant turn's training weight: its ``weight`` field (checked by the data reader), 1 by default (also
    when ``None``: a ``datasets`` table gives every message the fields of all)."""
    weight = message.get("weight")
    return 1.0 if weight is None else float(weight)


def to_messages(prompt: str, completion: Optional[str] = None, system: Optional[str] = None) -> Messages:
    """The chat messages of a prompt/completion pair: ``[system,] user[, assistant]``."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    return messages


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer renders chats with its own template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _needs_bos(tokenizer: Any, ids: list[int]) -> bool:
    """Whether the tokenizer adds a BOS token to plain text and ``ids`` does not start with it."""
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] == [bos]:
        return False
    return list(tokenizer("a", add_special_tokens=True)["input_ids"][:1]) == [bos]


def _render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _end_of_turn(tokenizer: Any, text: str, start: int, end: int) -> int:
    """``end`` moved back over whitespace that follows a special token closing the span ``text[start:end]``."""
    stripped = text[start:end].rstrip()
    if len(stripped) < end - start and any(stripped.endswith(t) for t in tokenizer.all_special_tokens):
        return start + len(stripped)
    return end


def _rendered_forms(content: str) -> list[str]:
    """How a template may render a message's content: verbatim, stripped, or — as Qwen3/R1-style templates render
    earlier assistant turns — with its reasoning up to ``</think>`` removed."""
    forms = [content, content.strip()]
    if "</think>" in content:
        tail = content.split("</think>")[-1]
        forms += [tail.lstrip("\n"), tail.strip()]
    return [f for i, f in enumerate(forms) if f and f not in forms[:i]]


def _find_turn(full: str, content: str, cursor: int, limit: int) -> tuple[int, int] | None:
    """``[start, end)`` of the first rendered form of ``content`` in ``full[cursor:limit]``, or None."""
    for form in _rendered_forms(content):
        start = full.find(form, cursor, limit)
        if start >= 0:
            return start, start + len(form)
    return None


def _chat_pieces(messages: Messages, tokenizer: Any) -> _Pieces:
    full = _render(tokenizer, messages, generation_prompt=False)
    pieces: _Pieces = []
    emitted = 0  # the end of the pieces so far
    cursor = 0  # every message's content is looked up after the previous message's: a user message that quotes
    # the answer can never be taken for the assistant turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            found = _find_turn(full, message["content"], cursor, len(full)) if message["content"].strip() else None
            if found is not None:
                cursor = found[1]
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else None
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if (
            before is not None
            and emitted <= len(before) < len(through)
            and through.startswith(before)
            and full.startswith(through)
        ):
            start, end = len(before), _end_of_turn(tokenizer, through, len(before), len(through))
        else:
            # The template renders prefixes differently (e.g. it rewrites earlier turns): find this turn's content
            # after the previous message's and before the next message's.
            following = next((m["content"] for m in messages[i + 1 :] if m["content"].strip()), None)
            nxt = _find_turn(full, following, cursor, len(full)) if following is not None else None
            limit = nxt[0] if nxt is not None else len(full)
            found = _find_turn(full, message["content"], cursor, limit)
            if found is None:
                raise DataError(
                    f"the chat template does not render assistant turn {i} verbatim (nor without its <think> part); "
                    f"cannot find which tokens to train"
                )
            start, end = found
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
        pieces += [(full[emitted:start], 0.0), (full[start:end], _weight(message))]
        emitted = cursor = end
    pieces.append((full[emitted:], 0.0))
    return pieces


def _generation_mask_encoding(messages: Messages, tokenizer: Any) -> tuple[list[int], list[float]] | None:
    """Token ids and their weights from the template's own ``{% generation %}`` markers, when it has them: the k-th
    marked span is the k-th assistant turn (with per-turn weights, the counts must agree)."""
    if "{% generation %}" not in (tokenizer.chat_template or "").replace("{%- generation %}", "{% generation %}"):
        return None
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=False
    )
    mask = out.get("assistant_masks")
    if mask is None or not any(mask):
        return None
    turns = [_weight(m) for m in messages if m["role"] == "assistant"]
    starts = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
    if any(w != 1.0 for w in turns) and len(starts) != len(turns):
        raise DataError(
            f"the chat template marks {len(starts)} generation spans for {len(turns)} assistant turns; cannot give "
            f"each turn its weight"
        )
    weights, turn = [], -1
    for i, m in enumerate(mask):
        turn += bool(m) and (i == 0 or not mask[i - 1])
        weights.append(turns[min(turn, len(turns) - 1)] if m else 0.0)
    return list(out["input_ids"]), weights


def _plain_pieces(messages: Messages, tokenizer: Any) -> _Pieces:
    pieces: _Pieces = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pieces.append((PLAIN_SYSTEM.format(content=content), 0.0))
        elif role == "user":
            pieces.append((PLAIN_INSTRUCTION.format(content=content), 0.0))
        else:
            pieces += [(PLAIN_RESPONSE, 0.0), (content + (tokenizer.eos_token or ""), _weight(message))]
    return pieces


def _tokenize_pieces(pieces: _Pieces, tokenizer: Any) -> tuple[list[int], list[float]]:
    """Token ids of the pieces joined, and each token's training weight (0: not trained).

    Consecutive pieces of one weight are merged first, so that only the starts and ends of trained spans are
    boundaries.
    The joined text is tokenised at once when every boundary is a token boundary of the whole (the prefix's
    tokenisation is a prefix of the whole's); otherwise each piece is tokenised on its own.
    """
    merged: _Pieces = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    pieces = merged
    full = _tokenize(tokenizer, "".join(text for text, _ in pieces))
    trained: list[float] = []
    prefix = ""
    for text, weight in pieces:
        prefix += text
        upto = _tokenize(tokenizer, prefix)
        if full[: len(upto)] != upto or len(upto) < len(trained):
            break
        trained += [weight] * (len(upto) - len(trained))
    else:
        if len(trained) == len(full):
            return full, trained
    ids: list[int] = []
    trained = []
    for text, weight in pieces:
        piece = _tokenize(tokenizer, text)
        ids += piece
        trained += [weight] * len(piece)
    return ids, trained


def encode_messages(
    messages: Messages, tokenizer: Any, max_length: Optional[int] = None
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation, truncated from the right to ``max_length`` tokens.

    ``labels`` copies ``input_ids`` on the assistant turns' tokens and is ``-100`` elsewhere (and on the turns of
    ``weight`` 0).
    """
    ids, labels, _ = encode_weighted_messages(messages, tokenizer, max_length)
    return ids, labels


def encode_weighted_messages(
    messages: Messages, tokenizer: Any, max_length: Optional[int] = None
) -> tuple[list[int], list[int], list[float]]:
    """``(input_ids, labels, weights)``: ``encode_messages`` and each token's training weight — its assistant
    turn's ``weight`` (1 by default) on trained tokens, 0 elsewhere."""
    marked = _generation_mask_encoding(messages, tokenizer) if has_chat_template(tokenizer) else None
    if marked is not None:
        ids, trained = marked
    else:
        pieces = _chat_pieces(messages, tokenizer) if has_chat_template(tokenizer) else _plain_pieces(messages, tokenizer)
        ids, trained = _tokenize_pieces(pieces, tokenizer)
    if _needs_bos(tokenizer, ids):
        ids, trained = [tokenizer.bos_token_id] + ids, [0.0] + trained
    labels = [t if w > 0 else IGNORE_INDEX for t, w in zip(ids, trained)]
    if max_length is not None:
        ids, labels, trained = ids[:max_length], labels[:max_length], trained[:max_length]
    return ids, labels, [float(w) for w in trained]


def prompt_ids(messages: Messages, tokenizer: Any) -> list[int]:
    """Token ids that prompt the model for the next assistant turn after ``messages`` (for generation).

    Chat template: the rendering with ``add_generation_prompt=True``; plain template: up to ``### Response:\\n``.
    """
    if has_chat_template(tokenizer):
        text = _render(tokenizer, messages, generation_prompt=True)
    else:
        text = "".join(text for text, _ in _plain_pieces(messages, tokenizer)) + PLAIN_RESPONSE
    ids = _tokenize(tokenizer, text)
    return [tokenizer.bos_token_id] + ids if _needs_bos(tokenizer, ids) else ids
