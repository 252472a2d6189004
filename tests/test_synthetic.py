import re

import pytest

from sstoken_pl.errors import ConfigError
from sstoken_pl.synthetic import _ITEMS, _NAMES, _RUN_CHARS, FILLER_SENTENCES, SyntheticTask, _wrong_answer

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def problem_key(prompt):
    """The problem's template shape (names, items and numbers blanked out) and its numbers."""
    shape = re.sub(r"\d+", "N", prompt)
    for name, _ in _NAMES:
        shape = re.sub(rf"\b{name}\b", "X", shape)
    for item in _ITEMS:
        shape = re.sub(rf"\b{item}\b", "Y", shape)
    shape = re.sub(r"\b(he|she|He|She)\b", "P", shape)
    return shape, tuple(int(n) for n in re.findall(r"\d+", prompt))


def test_same_seed_same_records_other_seed_other_records():
    a = SyntheticTask(num_train=100, num_val=20, seed=3)
    b = SyntheticTask(num_train=100, num_val=20, seed=3)
    c = SyntheticTask(num_train=100, num_val=20, seed=4)
    assert a.records("train") == b.records("train")
    assert a.records("val") == b.records("val")
    assert [r["prompt"] for r in a.records("train")] != [r["prompt"] for r in c.records("train")]


def test_sizes_and_fields():
    task = SyntheticTask(num_train=150, num_val=30)
    train, val = task.records("train"), task.records("val")
    assert (len(train), len(val)) == (150, 30)
    assert all(set(r) == {"prompt", "completion", "answer", "noise_spans"} for r in train + val)
    # Several templates are used: many different problem shapes in each split.
    assert len({problem_key(r["prompt"])[0] for r in train}) >= 6


def test_train_and_val_problems_are_disjoint_and_distinct():
    task = SyntheticTask(num_train=2000, num_val=200)
    train_keys = [problem_key(r["prompt"]) for r in task.records("train")]
    val_keys = [problem_key(r["prompt"]) for r in task.records("val")]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(val_keys)) == len(val_keys)
    assert not set(train_keys) & set(val_keys)


def test_val_split_does_not_depend_on_num_train():
    assert SyntheticTask(num_train=50, num_val=20).records("val") == SyntheticTask(num_train=500, num_val=20).records(
        "val"
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_solutions_are_correct_and_end_with_the_answer_line(split):
    for record in SyntheticTask(num_train=300, num_val=100, noise=0.5).records(split):
        body, last = record["completion"].rsplit("\n", 1)
        assert last == f"#### {record['answer']}"
        equations = EQUATION.findall(body)
        assert equations, record
        for a, op, b, c in equations:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), record
        assert int(equations[-1][3]) == int(record["answer"]) > 0
        # The numbers the first step uses come from the question.
        assert int(equations[0][0]) in problem_key(record["prompt"])[1]


def test_noise_share_and_never_in_val():
    clean = SyntheticTask(num_train=400, num_val=50, noise=0.0, seed=1)
    noisy = SyntheticTask(num_train=400, num_val=50, noise=0.3, seed=1)
    pairs = list(zip(clean.records("train"), noisy.records("train")))
    # The same problems at every noise level; only the responses of a 30% share differ.
    assert all(c["prompt"] == n["prompt"] and c["answer"] == n["answer"] for c, n in pairs)
    noised = [(c, n) for c, n in pairs if c["completion"] != n["completion"]]
    assert len(noised) == 120
    for c, n in noised:
        assert len(n["completion"]) > len(c["completion"])
        assert n["completion"].endswith(f"\n#### {c['answer']}")
        # Everything of the clean solution is still there, in order.
        for sentence in c["completion"].split("\n")[0].split(". "):
            assert sentence.rstrip(".") in n["completion"]
    assert any(any(f in n["completion"] for f in FILLER_SENTENCES) for _, n in noised)
    assert any(not any(f in n["completion"] for f in FILLER_SENTENCES) for _, n in noised)  # random-character runs
    assert all("#" not in n["completion"].rsplit("\n", 1)[0] for _, n in noised)

    all_noise = SyntheticTask(num_train=400, num_val=50, noise=1.0, seed=1)
    assert all_noise.records("val") == clean.records("val")
    assert not any(any(f in r["completion"] for f in FILLER_SENTENCES) for r in all_noise.records("val"))
    assert all(c["completion"] != n["completion"] for c, n in zip(clean.records("train"), all_noise.records("train")))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"noise": 1.5}, "data.synthetic.noise"),
        ({"noise": -0.1}, "data.synthetic.noise"),
        ({"num_train": 0}, "data.synthetic.num_train"),
        ({"num_val": -3}, "data.synthetic.num_val"),
        ({"label_noise": 1.5}, "data.synthetic.label_noise"),
        ({"label_noise": -0.1}, "data.synthetic.label_noise"),
        ({"label_noise": True}, "data.synthetic.label_noise"),
        ({"label_noise": "0.2"}, "data.synthetic.label_noise"),
        ({"label_noise": float("nan")}, "data.synthetic.label_noise"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        SyntheticTask(**kwargs)
    assert "\n" not in str(err.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        SyntheticTask(num_train=5, num_val=5).records("test")


# ------------------------------------------------------------------------------------------- noise ground truth
def span_texts(record):
    return [record["completion"][a:b] for a, b in record["noise_spans"]]


def without_spans(record, replace=None):
    """The completion with its noise spans removed (with one separating space each) or replaced by ``replace``."""
    text = record["completion"]
    for a, b in sorted(record["noise_spans"], reverse=True):
        if replace is not None:
            text = text[:a] + replace + text[b:]
        elif text[b : b + 1] == " ":
            text = text[:a] + text[b + 1 :]
        else:
            assert text[a - 1 : a] == " ", "a filler span is separated from its neighbours by one space"
            text = text[: a - 1] + text[b:]
    return text


def test_label_noise_share_and_wrong_result_and_answer():
    clean = SyntheticTask(num_train=400, num_val=20, noise=0.0, seed=5).records("train")
    noisy = SyntheticTask(num_train=400, num_val=20, noise=0.0, label_noise=0.3, seed=5).records("train")
    assert [c["prompt"] for c in clean] == [n["prompt"] for n in noisy]
    assert [c["answer"] for c in clean] == [n["answer"] for n in noisy], "the record's answer stays the true one"
    changed = [(c, n) for c, n in zip(clean, noisy) if c["completion"] != n["completion"]]
    assert len(changed) == 120
    two_step = 0
    for c, n in changed:
        body, last = n["completion"].rsplit("\n", 1)
        wrong = last.removeprefix("#### ")
        assert last == f"#### {wrong}" and wrong.isdigit()
        assert int(wrong) != int(c["answer"]) and int(wrong) >= 0 and abs(int(wrong) - int(c["answer"])) <= 9
        clean_eq, noisy_eq = EQUATION.findall(c["completion"]), EQUATION.findall(body)
        assert noisy_eq[-1][:3] == clean_eq[-1][:3] and noisy_eq[-1][3] == wrong, "the last result is the wrong answer"
        assert noisy_eq[:-1] == clean_eq[:-1], "only the final step changes"
        two_step += len(noisy_eq) == 2
        # The two spans are exactly the wrong result and the wrong answer; the rest is the clean solution.
        assert span_texts(n) == [wrong, wrong]
        assert n["noise_spans"][1] == [len(n["completion"]) - len(wrong), len(n["completion"])]
        assert without_spans(n, replace=c["answer"]) == c["completion"]
    assert two_step > 10
    assert all(n["noise_spans"] == [] for c, n in zip(clean, noisy) if c["completion"] == n["completion"])
    everything = SyntheticTask(num_train=50, num_val=20, noise=0.0, label_noise=1.0, seed=5).records("train")
    assert all(len(r["noise_spans"]) == 2 for r in everything)


def test_wrong_answers_are_never_negative_nor_right():
    import random

    rng = random.Random(0)
    for answer in [0, 1, 2, 5, 9, 10, 57]:
        wrong = {_wrong_answer(answer, rng) for _ in range(300)}
        assert answer not in wrong and min(wrong) >= 0 and max(wrong) <= answer + 9
        assert len(wrong) >= 9


def test_filler_noise_spans_are_the_inserted_pieces():
    clean = SyntheticTask(num_train=200, num_val=10, noise=0.0, seed=8).records("train")
    noisy = SyntheticTask(num_train=200, num_val=10, noise=1.0, seed=8).records("train")
    for c, n in zip(clean, noisy):
        assert c["noise_spans"] == [] and 1 <= len(n["noise_spans"]) <= 3
        for piece in span_texts(n):
            runs = all(set(word) <= set(_RUN_CHARS) and 2 <= len(word) <= 7 for word in piece.split(" "))
            assert piece in FILLER_SENTENCES or runs, piece
            assert piece == piece.strip()
        assert n["noise_spans"] == sorted(n["noise_spans"]) and all(a < b for a, b in n["noise_spans"])
        assert without_spans(n) == c["completion"]


def test_the_two_noise_streams_are_independent():
    def make(noise, label_noise, seed=3):
        task = SyntheticTask(num_train=300, num_val=20, noise=noise, label_noise=label_noise, seed=seed)
        return task.records("train")

    def fillers(r):
        return [t for t in span_texts(r) if not t.isdigit()]

    def shown(r):
        return r["completion"].rsplit("#### ", 1)[1]

    def true_label(r):
        """The completion with the true answer put back into the label-noise spans (a random run is never digits)."""
        text = r["completion"]
        for a, b in sorted(r["noise_spans"], reverse=True):
            text = text[:a] + r["answer"] + text[b:] if text[a:b].isdigit() else text
        return text

    filler_only, label_only, both = make(0.4, 0.0), make(0.0, 0.5), make(0.4, 0.5)
    assert [r["prompt"] for r in filler_only] == [r["prompt"] for r in label_only] == [r["prompt"] for r in both]
    # The same filler noise (which records, which pieces, where) whatever label_noise is ...
    assert [fillers(r) for r in filler_only] == [fillers(r) for r in both]
    assert [r["completion"] for r in filler_only] == [true_label(r) for r in both]
    # ... and the same wrong labels whatever noise is.
    assert [shown(r) for r in label_only] == [shown(r) for r in both]
    for level in (0.1, 0.9):
        assert [fillers(r) for r in make(0.4, level)] == [fillers(r) for r in filler_only]
        assert [shown(r) for r in make(level, 0.5)] == [shown(r) for r in label_only]
    # Both kinds land on some records together, their spans in text order.
    together = [r for r in both if fillers(r) and len(span_texts(r)) > len(fillers(r))]
    assert together
    for r in together:
        assert r["noise_spans"] == sorted(r["noise_spans"])
        assert span_texts(r)[-1] == shown(r) != r["answer"]


def test_validation_is_never_noised():
    clean = SyntheticTask(num_train=50, num_val=30, noise=0.0, label_noise=0.0, seed=2).records("val")
    noisy = SyntheticTask(num_train=50, num_val=30, noise=1.0, label_noise=1.0, seed=2).records("val")
    assert noisy == clean
    assert all(r["noise_spans"] == [] and r["completion"].endswith(f"#### {r['answer']}") for r in noisy)
