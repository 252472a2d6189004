"""The score store: ``python -m sstoken_pl score`` once, then history / reference values read with no forward."""

import csv
import glob
import json
import os

import numpy as np
import pytest
import torch
import yaml

from sstoken_pl.errors import ConfigError
from sstoken_pl.score_store import ScoreStore, check_store
from tests.test_cli import ROOT, cli

DATA = ["--data.synthetic.num_train=48", "--data.synthetic.num_val=8", "--data.synthetic.label_noise=0.3"]


def test_store_writes_resumes_and_reads_by_index(tmp_path):
    fp = {"model": "m", "data": 1}
    writer = ScoreStore.create(str(tmp_path), fp, num_samples=3)
    assert writer.write([(5, [0.5, 1.5]), (7, [2.0])]) == 2
    with pytest.raises(ConfigError, match="unfinished"):
        check_store(str(tmp_path), fp, "key")
    again = ScoreStore.create(str(tmp_path), fp, num_samples=3)  # an interrupted pass resumes
    assert again.done == {5, 7}
    assert again.write([(5, [9.0]), (9, [3.0, 4.0, 5.0])]) == 1, "stored samples are skipped"
    again.finish()
    store = check_store(str(tmp_path), fp, "key")
    positions = torch.tensor([[False, True, True, False], [False, False, False, True]])
    out = store.lookup(torch.tensor([5, 7]), positions)
    assert out.tolist() == [[0.0, 0.5, 1.5, 0.0], [0.0, 0.0, 0.0, 2.0]]
    with pytest.raises(ConfigError, match="holds 3 values for sample 9, whose batch has 2"):
        store.lookup(torch.tensor([9]), positions[:1])
    with pytest.raises(ConfigError, match="made for another run \\(data: 1 → 2\\)"):
        check_store(str(tmp_path), {"model": "m", "data": 2}, "key")
    with pytest.raises(ConfigError, match="holds scores of something else"):
        ScoreStore.create(str(tmp_path), {"model": "other", "data": 1}, num_samples=3)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "base"
    run = cli("score", "--config", "configs/tiny.yaml", *DATA, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scored 48 samples" in run.stdout
    return str(out)


def test_store_values_equal_the_online_forward(base_store):
    from sstoken_pl.cli import SSTokenCLI
    from sstoken_pl.data import SFTCollator, SFTDataModule
    from sstoken_pl.loss import per_token_nll, response_mask
    from sstoken_pl.module import SFTModule

    c = SSTokenCLI(SFTModule, SFTDataModule, args=["--config", os.path.join(ROOT, "configs", "tiny.yaml"), *DATA,
                                                   "--trainer.callbacks=[]", "--trainer.logger=false"],
                   run=False, save_config_callback=None)
    c.datamodule.tokenizer_source = c.model.tokenizer
    c.datamodule.setup("fit")
    c.model.configure_model()
    store = ScoreStore(base_store)
    assert store.complete and len(store) == 48
    batch = SFTCollator(c.datamodule.pad_token_id)([c.datamodule.train_dataset[i] for i in range(6)])
    with torch.no_grad():
        online = per_token_nll(c.model.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    stored = store.lookup(batch["index"], response_mask(batch["labels"]))
    torch.testing.assert_close(stored, online, atol=1e-5, rtol=1e-5)


def _method(tmp_path, scores=None):
    history = {"mode": "base"} if scores is None else {"mode": "base", "scores": scores}
    config = {"trainer": {"callbacks+": [
        {"class_path": "sstoken_pl.callbacks.HistoryModel", "init_args": history},
        {"class_path": "sstoken_pl.callbacks.TokenSelection", "init_args": {"method": "sstoken", "gamma": 1.0, "ratio": 0.5}},
    ]}}
    path = tmp_path / f"rel_{'store' if scores else 'online'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _fit(tmp_path, method, *extra):
    root = tmp_path / os.path.basename(method)[:-5]
    run = cli("fit", "--config", "configs/tiny.yaml", "--config", method, *DATA, f"--trainer.default_root_dir={root}",
              "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.logger=CSVLogger",
              f"--trainer.logger.save_dir={root}", "--model.export=false", "--trainer.enable_checkpointing=false", *extra)
    return run, root


def test_a_run_reading_the_store_equals_the_run_computing_online(tmp_path, base_store):
    results = []
    for scores in (None, base_store):
        run, root = _fit(tmp_path, _method(tmp_path, scores))
        assert run.returncode == 0, run.stderr[-3000:]
        (metrics,) = glob.glob(str(root / "lightning_logs" / "*" / "metrics.csv"))
        rows = [r for r in csv.DictReader(open(metrics)) if r.get("selection/kept_fraction")]
        results.append([(float(r["selection/kept_fraction"]), float(r["selection/rel_mean"]), float(r["train/loss"]))
                        for r in rows])
    assert len(results[0]) == 3
    for online, stored in zip(*results):
        assert online[0] == stored[0], "the same tokens kept"
        assert online[1:] == pytest.approx(stored[1:], rel=1e-5, abs=1e-6)


def test_a_store_of_another_run_is_refused(tmp_path, base_store):
    run, _ = _fit(tmp_path, _method(tmp_path, base_store), "--data.max_length=256")
    assert run.returncode == 2
    assert "HistoryModel.scores: the store" in run.stderr and "data.max_length: 384 → 256" in run.stderr


def test_an_interrupted_pass_resumes_to_the_same_store(tmp_path, base_store):
    out = tmp_path / "again"
    import shutil

    shutil.copytree(base_store, out)
    (shard,) = glob.glob(str(out / "*.idx.npy"))
    table = np.load(shard)
    np.save(shard, table[:20])  # as if the pass stopped after 20 samples
    meta = json.load(open(out / "meta.json"))
    json.dump({**meta, "complete": False}, open(out / "meta.json", "w"))
    run = cli("score", "--config", "configs/tiny.yaml", *DATA, "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scored 28 samples (20 already stored)" in run.stdout
    a, b = ScoreStore(base_store), ScoreStore(str(out))
    assert b.complete and len(b) == 48
    for i in range(48):
        np.testing.assert_allclose(a.values(i), b.values(i), atol=1e-5, rtol=1e-5)  # other batches: rounding


def test_reference_scores_replace_the_reference_forward(tmp_path):
    """Rho-1 reading the reference's store equals Rho-1 with the reference model loaded (and no model is loaded)."""
    from sstoken_pl.models import load_causal_lm, tiny_llama_config

    reference = tmp_path / "reference"
    load_causal_lm(config=tiny_llama_config(eos_token_id=4), seed=1).save_pretrained(reference)
    store = tmp_path / "scores"
    run = cli("score", "--config", "configs/tiny.yaml", *DATA, "--source", str(reference), "--out", str(store))
    assert run.returncode == 0, run.stderr[-3000:]
    assert ScoreStore(str(store)).fingerprint["model"]["reference"] == str(reference)
    results = []
    for args in ({"path": str(reference)}, {"scores": str(store)}):
        config = {"trainer": {"callbacks+": [
            {"class_path": "sstoken_pl.callbacks.ReferenceModel", "init_args": {**args, "check_tokenizer": False}},
            {"class_path": "sstoken_pl.callbacks.TokenSelection", "init_args": {"method": "rho1", "ratio": 0.5}},
        ]}}
        method = tmp_path / f"rho1_{next(iter(args))}.yaml"
        method.write_text(yaml.safe_dump(config))
        run, root = _fit(tmp_path, str(method))
        assert run.returncode == 0, run.stderr[-3000:]
        assert ("ReferenceModel: loaded" in run.stderr) == ("path" in args), "with scores no model is loaded"
        (metrics,) = glob.glob(str(root / "lightning_logs" / "*" / "metrics.csv"))
        rows = [r for r in csv.DictReader(open(metrics)) if r.get("selection/kept_fraction")]
        results.append([(float(r["selection/kept_fraction"]), float(r["train/loss"])) for r in rows])
    assert len(results[0]) == 3
    for loaded, stored in zip(*results):
        assert loaded[0] == stored[0] and loaded[1] == pytest.approx(stored[1], rel=1e-5)


@pytest.mark.parametrize("strategy", [["--trainer.strategy=ddp"], ["--config", "configs/strategies/fsdp2.yaml"]],
                         ids=["ddp", "fsdp2"])
def test_two_processes_score_what_one_does(tmp_path, base_store, strategy):
    """DDP, and FSDP2 with the scoring model sharded as training shards it: each rank scores its share."""
    out = tmp_path / "two"
    run = cli("score", "--config", "configs/tiny.yaml", *strategy, *DATA, "--trainer.devices=2",
              "--trainer.accelerator=cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(rank 0 of 2)" in run.stdout
    assert {p.name.split("-")[1] for p in out.glob("shard-*.idx.npy")} == {"000", "001"}, "each rank its own shards"
    one, two = ScoreStore(base_store), check_store(str(out), ScoreStore(base_store).fingerprint, "key")
    assert len(two) == 48
    for i in range(48):
        np.testing.assert_allclose(two.values(i), one.values(i), atol=1e-5, rtol=1e-5)


def test_a_packed_pass_stores_what_the_padded_one_does(tmp_path, base_store):
    """``data.packing``: the scoring forward runs on packed rows; the stored values are the samples' own (a store is
    one for both layouts: packing is not in its fingerprint)."""
    out = tmp_path / "packed"
    # rows of 1024 tokens hold ~4 samples (none is truncated at 384 either: the values are comparable)
    run = cli("score", "--config", "configs/tiny.yaml", *DATA, "--data.packing=true", "--data.max_length=1024",
              "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    padded, packed = ScoreStore(base_store), ScoreStore(str(out))
    assert len(packed) == len(padded) == 48
    assert {k: v for k, v in packed.fingerprint["data"].items() if k != "max_length"} == {
        k: v for k, v in padded.fingerprint["data"].items() if k != "max_length"}
    for index in padded.indices():
        np.testing.assert_allclose(packed.values(index), padded.values(index), atol=1e-5, rtol=1e-6)
