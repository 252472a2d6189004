import re

import pytest

from sstoken_pl.errors import ConfigError
from sstoken_pl.synthetic import _ITEMS, _NAMES, FILLER_SENTENCES, SyntheticTask

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
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        SyntheticTask(**kwargs)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        SyntheticTask(num_train=5, num_val=5).records("test")
