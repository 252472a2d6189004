"""Record formats: detecting a record's format, normalising it to chat messages and a gold answer, extracting the final
answer of a solution, and checking the training weights given in the data."""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Mapping, Optional

from sstoken_pl.errors import ConfigError, DataError
from sstoken_pl.templates import ROLES, Messages, to_messages

Format = Literal["auto", "prompt_completion", "messages", "alpaca", "gsm8k"]
# Each format's required fields, in the order ``auto`` tries them.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "gsm8k": ("question", "answer"),
}

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer of a solution: after the last ``####`` (its first number, else its first line), else the
    last number in the text; commas removed. ``None`` when there is none.
    """
    if "####" in text:
        lines = text.rsplit("####", 1)[1].strip().splitlines()
        tail = lines[0].strip() if lines else ""
        found = _NUMBER.search(tail)
        answer = found.group() if found else tail.rstrip(".")
    else:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else ""
    answer = answer.replace(",", "")
    return answer or None


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """The format whose required fields the record has (``FORMAT_FIELDS`` order)."""
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in record for f in fields):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(fields)}" for fmt, fields in FORMAT_FIELDS.items())
    raise DataError(
        f"{where}: cannot detect the data format from the fields {sorted(record)}; expected the fields of one of "
        f"({expected}), or set data.format"
    )


def _text(record: Mapping[str, Any], field: str, where: str, fmt: str, optional: bool = False) -> str:
    if field not in record or (optional and record[field] is None):
        if optional:
            return ""
        raise DataError(f"{where}: the record has no {field!r} field (format {fmt})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def check_weight(value: Any, where: str) -> float:
    """A training weight from the data: a finite number ≥ 0 (0: not trained), else one ``DataError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where} must be a number ≥ 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{where} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def sample_weight(record: Mapping[str, Any], where: str) -> float:
    """The record's ``weight`` field (every format): multiplies the weight of each of its trained tokens; 1 if absent."""
    return check_weight(record["weight"], f"{where}: field 'weight'") if record.get("weight") is not None else 1.0


def _messages(record: Mapping[str, Any], where: str, system_prompt: Optional[str]) -> Messages:
    if "messages" not in record:
        raise DataError(f"{where}: the record has no 'messages' field (format messages)")
    turns = record["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    messages: Messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] must be an object with a role in {ROLES} and a string content, got {turn!r}"
            )
        message = {"role": turn["role"], "content": turn["content"]}
        if "weight" in turn:
            weight = check_weight(turn["weight"], f"{where}: messages[{i}].weight")
            if weight and turn["role"] != "assistant":
                raise DataError(
                    f"{where}: messages[{i}].weight is {turn['weight']!r} on a {turn['role']} turn; only assistant "
                    f"turns are trained (give it weight 0 or none)"
                )
            if turn["role"] == "assistant":
                message["weight"] = weight
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to train on")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def normalise(
    record: Mapping[str, Any], fmt: str, where: str, system_prompt: Optional[str] = None, strip_calculator: bool = True
) -> tuple[Messages, str]:
    """A record of format ``fmt`` as chat messages and its gold answer (see ``SFTDataModule.eval_problems``)."""
    if fmt == "messages":
        messages = _messages(record, where, system_prompt)
        return messages, next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    if fmt == "prompt_completion":
        prompt, completion = _text(record, "prompt", where, fmt), _text(record, "completion", where, fmt)
        return to_messages(prompt, completion, system_prompt), completion
    if fmt == "alpaca":
        instruction, output = _text(record, "instruction", where, fmt), _text(record, "output", where, fmt)
        extra = _text(record, "input", where, fmt, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return to_messages(prompt, output, system_prompt), output
    if fmt == "gsm8k":
        question, answer = _text(record, "question", where, fmt), _text(record, "answer", where, fmt)
        if strip_calculator:
            answer = _CALCULATOR.sub("", answer)
        return to_messages(question, answer, system_prompt), extract_final_answer(answer) or answer.strip()
    raise ConfigError(f"data.format must be one of auto, {', '.join(FORMAT_FIELDS)}; got {fmt!r}")
