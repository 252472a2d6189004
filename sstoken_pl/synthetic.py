"""A built-in synthetic SFT task: short arithmetic word problems with worked solutions (no files needed).

Every problem takes one or two steps with small numbers (add, subtract, multiply by small integers), and its
solution ends with the GSM8K answer line ``#### <answer>``::

    Tom starts with 12 apples. He buys 7 more, so he has 12 + 7 = 19 apples.
    #### 19

Problems are generated deterministically from ``seed``. A problem is identified by its key (template, numbers):
the validation problems are the first ``num_val`` keys drawn and the training problems the next ``num_train``, so
the two splits never share a key, and the validation split does not depend on ``num_train``.

A share ``noise`` of the *training* responses is noised: filler sentences ("Let me think about this carefully.")
and runs of random characters are inserted among the solution's sentences, before the final ``#### <answer>``
line, which stays correct. A share ``label_noise`` of the training responses gets a wrong label: the final
computation's result (the last ``= <result>``; for two-step problems only the second step's) and the
``#### <answer>`` become the same wrong number, the answer ± 1..9 (never negative). The record's ``answer`` field
stays the true answer. The validation responses are never noised. Which problems are noised, and how, is drawn from
random streams separate from the problems' and from each other (seeded ``"{seed}-noise"`` and
``"{seed}-label-noise"``), so the same seed gives the same problems at every noise level, and the same filler noise
at every label-noise level (and vice versa).

Every record carries the ground truth of its noise: ``noise_spans``, the ``[start, end)`` character spans of the
completion that are injected — each filler piece (without the single space that separates it from its neighbours),
and the wrong result's and the wrong answer's digits — in text order; ``[]`` for a clean record. Removing the filler
spans with one separating space each, and putting the true answer into the label-noise spans, gives back the clean
completion.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from sstoken_pl.errors import ConfigError

_NAMES = [
    ("Tom", "he"),
    ("Anna", "she"),
    ("Liam", "he"),
    ("Mia", "she"),
    ("Noah", "he"),
    ("Emma", "she"),
    ("Ravi", "he"),
    ("Sofia", "she"),
    ("Ken", "he"),
    ("Lucy", "she"),
    ("Omar", "he"),
    ("Zoe", "she"),
]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "cards", "books", "shells", "coins", "stamps"]

FILLER_SENTENCES = [
    "Let me think about this carefully.",
    "Math is fun!",
    "Hmm, okay.",
    "This is a nice problem.",
    "I like word problems.",
    "Let me double-check that.",
    "Wait, let me see.",
    "That reminds me of my school days.",
    "Numbers are everywhere.",
    "Okay, moving on.",
]
# Characters of the random runs: no '#', so a run never looks like the answer line.
_RUN_CHARS = string.ascii_lowercase + string.digits + "@%&*+=~^!?"

# A problem: its question and the worked solution's sentences (without the answer line), and the answer.
_Problem = tuple[str, list[str], int]
# A template draws its numbers from an rng, and writes the problem for a (name, pronoun, item) and those numbers.
_Template = tuple[str, Callable[[random.Random], tuple[int, ...]], Callable[[str, str, str, tuple[int, ...]], _Problem]]


def _buy(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b = n
    return (
        f"{name} has {a} {item}. {he.capitalize()} buys {b} more. How many {item} does {name} have now?",
        [f"{name} starts with {a} {item}. {he.capitalize()} buys {b} more, so {he} has {a} + {b} = {a + b} {item}."],
        a + b,
    )


def _give(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b = n
    return (
        f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
        [f"{name} starts with {a} {item} and gives away {b}, so {he} has {a} - {b} = {a - b} {item} left."],
        a - b,
    )


def _boxes(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b = n
    return (
        f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy?",
        [f"Each of the {a} boxes holds {b} {item}, so {name} buys {a} * {b} = {a * b} {item}."],
        a * b,
    )


def _pages(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b = n
    return (
        f"On Monday, {name} reads {a} pages. On Tuesday, {he} reads {b} pages. "
        f"How many pages does {name} read in the two days?",
        [f"{name} reads {a} pages and then {b} pages, so {he} reads {a} + {b} = {a + b} pages."],
        a + b,
    )


def _wage(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b = n
    return (
        f"{name} earns {a} dollars per hour and works for {b} hours. How many dollars does {name} earn?",
        [f"{name} earns {a} dollars for each of the {b} hours, so {he} earns {a} * {b} = {a * b} dollars."],
        a * b,
    )


def _buy_give(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b, c = n
    return (
        f"{name} has {a} {item}. {he.capitalize()} buys {b} more and then gives {c} to a friend. "
        f"How many {item} does {name} have now?",
        [
            f"After buying, {name} has {a} + {b} = {a + b} {item}.",
            f"After giving {c} away, {he} has {a + b} - {c} = {a + b - c} {item}.",
        ],
        a + b - c,
    )


def _bags_loose(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b, c = n
    return (
        f"{name} has {a} bags with {b} {item} in each bag, and {c} more {item} outside the bags. "
        f"How many {item} does {name} have in total?",
        [
            f"The bags hold {a} * {b} = {a * b} {item}.",
            f"With the other {c}, {name} has {a * b} + {c} = {a * b + c} {item}.",
        ],
        a * b + c,
    )


def _daily_eat(name: str, he: str, item: str, n: tuple[int, ...]) -> _Problem:
    a, b, c = n
    return (
        f"{name} collects {a} {item} every day for {b} days, then loses {c} of them. "
        f"How many {item} does {name} have left?",
        [
            f"In {b} days {name} collects {a} * {b} = {a * b} {item}.",
            f"After losing {c}, {he} has {a * b} - {c} = {a * b - c} {item}.",
        ],
        a * b - c,
    )


def _pair(lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> Callable[[random.Random], tuple[int, ...]]:
    return lambda rng: (rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b))


def _smaller_second(rng: random.Random) -> tuple[int, ...]:
    a = rng.randint(10, 60)
    return a, rng.randint(2, a - 1)


def _buy_give_numbers(rng: random.Random) -> tuple[int, ...]:
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    return a, b, rng.randint(2, a + b - 1)


def _bags_numbers(rng: random.Random) -> tuple[int, ...]:
    return rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)


def _daily_numbers(rng: random.Random) -> tuple[int, ...]:
    a, b = rng.randint(2, 12), rng.randint(2, 7)
    return a, b, rng.randint(1, a * b - 1)


TEMPLATES: list[_Template] = [
    ("buy", _pair(2, 50, 2, 30), _buy),
    ("give", _smaller_second, _give),
    ("boxes", _pair(2, 25, 2, 12), _boxes),
    ("pages", _pair(5, 60, 5, 60), _pages),
    ("wage", _pair(3, 30, 2, 10), _wage),
    ("buy_give", _buy_give_numbers, _buy_give),
    ("bags_loose", _bags_numbers, _bags_loose),
    ("daily_eat", _daily_numbers, _daily_eat),
]


def _noise_piece(rng: random.Random) -> str:
    """A filler sentence or a run of random characters (in 1 case of 2)."""
    if rng.random() < 0.5:
        return rng.choice(FILLER_SENTENCES)
    words = ["".join(rng.choices(_RUN_CHARS, k=rng.randint(2, 7))) for _ in range(rng.randint(2, 6))]
    return " ".join(words)


# A piece of a solution: its text and the [start, end) character spans inside it that are noise.
_Piece = tuple[str, list[tuple[int, int]]]


def _noised(pieces: list[_Piece], rng: random.Random) -> list[_Piece]:
    """The solution's sentences with 1 to 3 noise pieces (wholly noise) inserted at random places among them."""
    out = list(pieces)
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(out))  # drawn before the piece, as always: the same seed gives the same noise
        text = _noise_piece(rng)
        out.insert(at, (text, [(0, len(text))]))
    return out


def _wrong_answer(answer: int, rng: random.Random) -> int:
    """A wrong answer near the true one: answer ± 1..9, never negative."""
    offset = rng.choice([d for d in range(-9, 10) if d != 0])
    return answer + offset if answer + offset >= 0 else answer + abs(offset)


def _mislabelled(sentences: list[str], answer: int, wrong: int) -> list[_Piece]:
    """The sentences with the final computation's result (the last ``= <answer>``) replaced by ``wrong``."""
    pieces: list[_Piece] = [(s, []) for s in sentences]
    last = sentences[-1]
    at = last.rfind(f"= {answer}")
    if at < 0:
        raise ValueError(f"synthetic: no '= {answer}' in the last sentence {last!r}")
    start = at + 2
    text = last[:start] + str(wrong) + last[start + len(str(answer)) :]
    pieces[-1] = (text, [(start, start + len(str(wrong)))])
    return pieces


@dataclass
class SyntheticTask:
    """The built-in arithmetic word-problem task (used when ``data.path`` is not set).

    Args:
        num_train: number of training problems.
        num_val: number of held-out problems (validation loss and answer accuracy); never noised.
        noise: share in [0, 1] of the training responses with filler sentences and random characters inserted
            before the final ``#### <answer>`` line.
        label_noise: share in [0, 1] of the training responses whose final result (the last ``= <result>``) and
            ``#### <answer>`` are replaced by the same wrong number (answer ± 1..9, never negative); drawn
            independently of ``noise``. The record's ``answer`` field stays the true one.
        seed: the problems (and the noise) are a function of this seed.
        clean_copies: append to the training split the noise-free versions of its first this many problems (all of
            them if fewer): the clean subset a reference model trains on (``noise=0 label_noise=0`` and
            ``data.max_samples``), mixed into the noisy data. The ``noise`` and ``label_noise`` shares are of the
            ``num_train`` problems; the copies have no noise spans.

    Records (``records``) are ``{"prompt", "completion", "answer", "noise_spans"}``: ``noise_spans`` lists the
    ``[start, end)`` character spans of ``completion`` that are injected noise (see the module docstring).
    """

    num_train: int = 2000
    num_val: int = 200
    noise: float = 0.3
    label_noise: float = 0.0
    seed: int = 0
    clean_copies: int = 0

    def __post_init__(self) -> None:
        for field in ("num_train", "num_val"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.synthetic.{field} must be a positive integer, got {value!r}")
        for field in ("noise", "label_noise"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.synthetic.{field} must be in [0, 1], got {value!r}")
        if isinstance(self.clean_copies, bool) or not isinstance(self.clean_copies, int) or self.clean_copies < 0:
            raise ConfigError(f"data.synthetic.clean_copies must be a non-negative integer, got {self.clean_copies!r}")

    def _problems(self) -> list[tuple[str, list[str], int]]:
        """``num_val + num_train`` problems with distinct (template, numbers) keys, validation ones first."""
        rng = random.Random(self.seed)
        total = self.num_val + self.num_train
        seen: set[tuple[str, tuple[int, ...]]] = set()
        problems: list[_Problem] = []
        attempts = 0
        while len(problems) < total:
            attempts += 1
            if attempts > 100 * total:
                raise ConfigError(
                    f"data.synthetic: could not draw {total} distinct problems (num_train + num_val); "
                    f"got {len(problems)}, ask for fewer"
                )
            key, numbers, write = rng.choice(TEMPLATES)
            n = numbers(rng)
            name, pronoun = rng.choice(_NAMES)
            item = rng.choice(_ITEMS)
            if (key, n) in seen:
                continue
            seen.add((key, n))
            problems.append(write(name, pronoun, item, n))
        return problems

    def records(self, split: str) -> list[dict]:
        """The ``"train"`` or ``"val"`` problems as ``{"prompt", "completion", "answer", "noise_spans"}`` records."""
        if split not in ("train", "val"):
            raise ValueError(f"SyntheticTask.records: split must be 'train' or 'val', got {split!r}")
        problems = self._problems()
        if split == "val":
            val = problems[: self.num_val]
            return [_record(q, [(s, []) for s in sentences], answer, answer) for q, sentences, answer in val]
        train = problems[self.num_val :]
        noise_rng = random.Random(f"{self.seed}-noise")
        noised = set(noise_rng.sample(range(len(train)), round(self.noise * len(train))))
        label_rng = random.Random(f"{self.seed}-label-noise")
        mislabelled = sorted(label_rng.sample(range(len(train)), round(self.label_noise * len(train))))
        wrong = {i: _wrong_answer(train[i][2], label_rng) for i in mislabelled}
        records = []
        for i, (q, sentences, answer) in enumerate(train):
            shown = wrong.get(i, answer)
            pieces = _mislabelled(sentences, answer, shown) if i in wrong else [(s, []) for s in sentences]
            if i in noised:
                pieces = _noised(pieces, noise_rng)
            records.append(_record(q, pieces, answer, shown))
        clean = [_record(q, [(s, []) for s in sentences], answer, answer) for q, sentences, answer in train[: self.clean_copies]]
        return records + clean


def _record(question: str, pieces: list[_Piece], answer: int, shown: int) -> dict:
    """A record from the solution's pieces; ``shown`` is the answer the response states (wrong under label noise)."""
    text, spans = "", []
    for piece, piece_spans in pieces:
        if text:
            text += " "
        spans += [(len(text) + a, len(text) + b) for a, b in piece_spans]
        text += piece
    text += "\n#### "
    if shown != answer:
        spans.append((len(text), len(text) + len(str(shown))))
    text += str(shown)
    return {"prompt": question, "completion": text, "answer": str(answer), "noise_spans": [list(s) for s in spans]}
