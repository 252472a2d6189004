"""Chat templates that render earlier assistant turns differently from the last (Qwen3/R1 style), and templates with
generation markers: exactly the assistant content is labelled."""

import pytest

from sstoken_pl.errors import DataError
from sstoken_pl.loss import IGNORE_INDEX
from sstoken_pl.templates import encode_messages

# Earlier assistant turns lose their reasoning; the generation prompt opens an empty think block.
QWEN3_LIKE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set c = m['content'] %}"
    "{%- if not loop.last %}{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
WITH_MARKERS = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def trained(tok, ids, labels):
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_qwen3_like_template_labels_the_assistant_turns_not_the_user_quote(chat_tok):
    chat_tok.chat_template = QWEN3_LIKE
    messages = [
        {"role": "user", "content": "Repeat after me: 4"},
        {"role": "assistant", "content": "<think>\neasy\n</think>\n\n4"},
        {"role": "user", "content": "And 4 plus 1? The answer is 5"},
        {"role": "assistant", "content": "5"},
    ]
    ids, labels = encode_messages(messages, chat_tok)
    # the earlier turn as rendered (no reasoning), the last turn as given; never the user's "4" or "5"
    assert trained(chat_tok, ids, labels) == ["4<|im_end|>", "5<|im_end|>"]
    text = chat_tok.decode(ids)
    first = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    positions = [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    assert len(chat_tok.decode(ids[: positions[0]])) == first, "the first label is the assistant's answer"


def test_a_turn_that_cannot_be_found_is_refused(chat_tok):
    # prefixes are not prefixes (the generation prompt differs) and the content is rewritten: no way to tell
    chat_tok.chat_template = (
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + ':\\n' + (m['content'] | upper) + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    with pytest.raises(DataError, match="does not render assistant turn 1"):
        encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], chat_tok)


def test_generation_markers_label_exactly_what_they_mark(chat_tok):
    chat_tok.chat_template = WITH_MARKERS
    messages = [{"role": "user", "content": "2+2? say 4"}, {"role": "assistant", "content": "4"}]
    ids, labels = encode_messages(messages, chat_tok)
    assert trained(chat_tok, ids, labels) == ["4<|im_end|>"]


@pytest.mark.parametrize("markers", [False, True])
def test_turn_weights_follow_their_turns(chat_tok, markers):
    from sstoken_pl.templates import encode_weighted_messages

    if markers:
        chat_tok.chat_template = WITH_MARKERS
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "ab", "weight": 2.0},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "cd", "weight": 0.0},
                {"role": "user", "content": "q3"}, {"role": "assistant", "content": "ef"}]
    ids, labels, weights = encode_weighted_messages(messages, chat_tok)
    assert trained(chat_tok, ids, labels) == ["ab<|im_end|>", "ef<|im_end|>"]
    runs = [(chat_tok.decode([i]), w) for i, l, w in zip(ids, labels, weights) if l != IGNORE_INDEX]
    assert [w for _, w in runs] == [2.0] * 3 + [1.0] * 3
    assert all(w == 0 for l, w in zip(labels, weights) if l == IGNORE_INDEX)
