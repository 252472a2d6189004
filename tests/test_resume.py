"""Resuming and interruptions: exact mid-epoch resume, atomic checkpoints, SIGTERM/Ctrl-C, refused resumes."""

import os
import signal
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch

from tests.test_cli import ROOT, cli

CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")
METHODS = os.path.join(ROOT, "configs", "methods")


class Recorder(pl.Callback):
    """Records each training batch's sample indices and loss; saves a checkpoint after optimizer step ``save_at``.

    Put last on the trainer (as ModelCheckpoint is), so the checkpoint holds every callback's state after the batch.
    """

    def __init__(self, save_at=None, path=None):
        self.save_at, self.path = save_at, path
        self.batches = {}  # global step after the batch → (indices, loss)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches[trainer.global_step] = (batch["index"].tolist(), float(outputs["loss"]))
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


class StepFile(pl.Callback):
    """Writes the global step to ``<path>`` after every training batch (the SIGTERM test waits on it)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "w") as f:
            f.write(str(trainer.global_step))


def cli_fit(tmp_path, args, ckpt_path=None, save_at=None, name="run"):
    """The CLI's objects (its default callbacks and plugins included), fitted in this process."""
    from sstoken_pl.cli import SSTokenCLI, check_resume
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    cli_args = [
        "--config", CONFIG, *args,
        f"--trainer.default_root_dir={tmp_path / name}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--model.export=false",
        "--data.synthetic.num_train=48",  # 6 batches of 8: the 8 steps cross into a second epoch
        "--data.max_length=160",  # shorter samples (truncated, none dropped): faster steps
    ]
    c = SSTokenCLI(SFTModule, SFTDataModule, args=cli_args, run=False, save_config_callback=None)
    recorder = Recorder(save_at, str(tmp_path / f"{name}-step{save_at}.ckpt"))
    c.trainer.callbacks.append(recorder)
    check_resume(ckpt_path, c.model, c.trainer)
    c.trainer.fit(c.model, c.datamodule, ckpt_path=ckpt_path)
    return c, recorder


def _state(c):
    from sstoken_pl.callbacks import HistoryModel, TokenSelection

    trainer = c.trainer
    history = next(cb for cb in trainer.callbacks if isinstance(cb, HistoryModel))
    selection = next(cb for cb in trainer.callbacks if isinstance(cb, TokenSelection))
    return {
        "weights": {n: p.detach().clone() for n, p in c.model.model.named_parameters() if p.requires_grad},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "history": history.state_dict(),
        "selection": selection.state_dict(),
        "global_step": trainer.global_step,
    }


def _assert_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    "lora, method, save_at, packed",
    [
        (False, "sstoken", 4, False),  # full fine-tuning, base history (a copy of the weights), mid-epoch
        (True, "sstoken", 6, False),  # LoRA base history (adapters off), at the end of epoch 0
        (False, "sstoken_snapshot", 5, False),  # between two snapshots (every 3 steps)
        (True, "sstoken_ema", 4, False),  # LoRA dropout: the random generators must be restored too
        (True, "sstoken_ema", 3, True),  # data.packing: rows of 640 hold 2–3 samples (5 of 6 batches packed)
    ],
)
def test_resume_is_exact(tmp_path, lora, method, save_at, packed):
    """8 steps straight equal ``save_at`` steps + a resume to 8: weights, optimizer, scheduler, history and selection
    states, and the batches (data order) and losses of the steps after the checkpoint, bit for bit."""
    history = {"sstoken": "{mode: base}", "sstoken_snapshot": "{mode: snapshot, snapshot_every: 3}",
               "sstoken_ema": "{mode: ema, ema_decay: 0.5}"}[method]  # updates that show within 8 steps
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        f"    - {{class_path: sstoken_pl.callbacks.HistoryModel, init_args: {history}}}\n"
        "    - {class_path: sstoken_pl.callbacks.AttentionScore}\n"
        "    - {class_path: sstoken_pl.callbacks.TokenSelection, init_args: {method: sstoken, ratio: 0.6}}\n"
    )
    args = ["--config", str(callbacks), "--trainer.max_steps=8"]
    args += ["--model.lora.r=4", "--model.lora.alpha=8"] if lora else []
    args += ["--data.packing=true", "--data.max_length=640"] if packed else []
    straight, seen = cli_fit(tmp_path, args, save_at=save_at, name="straight")
    checkpoint = seen.path
    assert os.path.isfile(checkpoint)
    resumed, seen_resumed = cli_fit(tmp_path, args, ckpt_path=checkpoint, name="resumed")
    assert sorted(seen_resumed.batches) == list(range(save_at + 1, 9)), "the resume starts at the next step"
    for step in range(save_at + 1, 9):
        assert seen_resumed.batches[step] == seen.batches[step], f"step {step}: other batch or loss"
    _assert_equal(_state(straight), _state(resumed))


def test_sampler_keeps_the_shuffling_loader_order_and_resumes():
    """One process: the order of ``DataLoader(shuffle=True, generator=seed)`` as Lightning iterates it (``len``
    batches per epoch; the data order of runs before the resumable sampler), epoch after epoch; several: each rank a
    stride of it; ``resume`` continues mid-epoch."""
    from itertools import islice

    from torch.utils.data import DataLoader

    from sstoken_pl.data import ResumableSampler

    for n, batch_size in ((21, 4), (24, 8)):  # with and without a partial last batch
        generator = torch.Generator().manual_seed(7)
        old = DataLoader(list(range(n)), batch_size=batch_size, shuffle=True, generator=generator)
        old_epochs = [[i for b in islice(iter(old), len(old)) for i in b.tolist()] for _ in range(3)]
        sampler = ResumableSampler(n, seed=7, batch_size=batch_size)
        new = DataLoader(list(range(n)), batch_size=batch_size, sampler=sampler)
        new_epochs = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            new_epochs.append([i for b in new for i in b.tolist()])
        assert new_epochs == old_epochs, (n, batch_size)
    ranks = [ResumableSampler(21, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    shards = [list(r) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 11 and sorted(set(shards[0] + shards[1])) == list(range(21))
    ranks[1].set_epoch(0)  # a premature set_epoch (Lightning may iterate before it restores the loops) is overridden
    ranks[1].resume(1, 8)
    assert list(ranks[1]) == shards[1][8:] and ranks[1].epoch == 1
    assert list(ranks[1]) == shards[1], "the resume applies to one iteration only"


# ---------------------------------------------------------------------------------------------------- atomic saves
def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import sstoken_pl.checkpoint_io as checkpoint_io
    from sstoken_pl.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"\x80\x02partial")  # a write that dies midway (disk full, killed)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    old = io.load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.ckpt"], "no temporary file is left behind"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2


def test_the_cli_uses_atomic_checkpoints_and_resume_callbacks():
    from sstoken_pl.callbacks import ExactResume, SaveOnInterrupt
    from sstoken_pl.checkpoint_io import AtomicCheckpointIO
    from sstoken_pl.cli import SSTokenCLI
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    c = SSTokenCLI(SFTModule, SFTDataModule, args=["--config", CONFIG, "--trainer.logger=false"], run=False)
    assert isinstance(c.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(cb, ExactResume) for cb in c.trainer.callbacks) == 1
    interrupt = [cb for cb in c.trainer.callbacks if isinstance(cb, SaveOnInterrupt)]
    assert len(interrupt) == 1 and interrupt[0].enabled
    off = SSTokenCLI(SFTModule, SFTDataModule, args=["--config", CONFIG, "--interrupt.enabled=false"], run=False)
    assert not next(cb for cb in off.trainer.callbacks if isinstance(cb, SaveOnInterrupt)).enabled


# ---------------------------------------------------------------------------------------------------- interrupts
def test_ctrl_c_saves_a_checkpoint_in_any_lightning_module(tmp_path, tiny_llama):
    """A user's own module and loader: Ctrl-C in step 3 → a checkpoint after step 3, SystemExit(130), the previous
    SIGINT handler back; the checkpoint resumes to the end."""
    from sstoken_pl.callbacks import ExactResume, SaveOnInterrupt
    from tests.helpers import ForeignModule, loader, random_batches, trainer

    class CtrlCAtStep3(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    interrupt = SaveOnInterrupt(dirpath=str(tmp_path))
    t = trainer(max_steps=6, callbacks=[interrupt, CtrlCAtStep3(), ExactResume()])
    with pytest.raises(SystemExit) as exit_info:
        t.fit(ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(8)))
    assert exit_info.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before, "the previous SIGINT handler is restored"
    assert interrupt.saved_path == str(tmp_path / "interrupted-epoch=0-step=3.ckpt")
    assert torch.load(interrupt.saved_path, weights_only=True)["global_step"] == 3
    t2 = trainer(max_steps=6, callbacks=[SaveOnInterrupt(dirpath=str(tmp_path)), ExactResume()])
    t2.fit(ForeignModule(tiny_llama), train_dataloaders=loader(random_batches(8)), ckpt_path=interrupt.saved_path)
    assert t2.global_step == 6


def test_sigterm_from_the_cli_saves_and_resumes(tmp_path):
    """``fit`` in a subprocess, SIGTERM after a few steps: exit status 143, the checkpoint's path in the log, and
    ``fit --ckpt_path`` on it runs to the end."""
    marker = tmp_path / "step"
    common = [
        "fit", "--config", "configs/tiny.yaml", "--config", "configs/methods/sstoken_ema.yaml",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=0", "--model.export=false",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [*common, "--trainer.max_steps=10000", "--trainer.callbacks+=tests.test_resume.StepFile",
            f"--trainer.callbacks.path={marker}"]
    proc = subprocess.Popen([sys.executable, "-m", "sstoken_pl", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (marker.exists() and marker.read_text().strip() and int(marker.read_text()) >= 2):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training step within the time limit"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    checkpoints = list(tmp_path.glob("checkpoints/interrupted-*.ckpt"))
    assert len(checkpoints) == 1, out[-3000:]
    path = checkpoints[0]
    assert "saved a resumable checkpoint at step" in out and str(path) in out, out[-3000:]
    step = torch.load(path, weights_only=True)["global_step"]
    assert step >= 2
    second = cli(*common, f"--trainer.max_steps={step + 2}", f"--ckpt_path={path}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"max_steps={step + 2}` reached" in second.stderr


# ---------------------------------------------------------------------------------------------------- refusals
def _run_cli(args, capsys):
    from sstoken_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A 1-step ssToken (EMA history) LoRA run's checkpoint."""
    root = tmp_path_factory.mktemp("lora_ckpt")
    from sstoken_pl.cli import main

    main(["fit", "--config", CONFIG, "--config", os.path.join(METHODS, "sstoken_ema.yaml"), "--model.lora.r=4",
          "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--model.export=false", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", "--data.synthetic.num_train=16"])
    return str(next(root.glob("checkpoints/*.ckpt")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.lora.r=8"], "model.lora.r was 4, now 8"),
        (["--model.lora.target_modules=[q_proj,v_proj]"], "model.lora.target_modules was 'all-linear'"),
        (["--model.lora=null"], "trained with LoRA r=4, this run has full fine-tuning"),
        (["--model.model_config.hidden_size=32"], "model.model_config was"),
        (["--trainer.callbacks=[]", "--config", os.path.join(METHODS, "sstoken_snapshot.yaml")],
         "HistoryModel.mode was 'ema', now 'snapshot'"),
        (["--trainer.callbacks=[]", "--config", os.path.join(METHODS, "rho1.yaml")],
         "token selection was method 'sstoken', now method 'rho1'"),
        (["--trainer.callbacks=[]"], "token selection was method 'sstoken', now plain SFT"),
    ],
)
def test_a_resume_that_does_not_fit_is_one_line(lora_checkpoint, tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "reference").mkdir(parents=True)  # rho1.yaml's reference path: a folder that exists
    base = ["fit", "--config", CONFIG, "--config", os.path.join(METHODS, "sstoken_ema.yaml"), "--model.lora.r=4",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--model.export=false", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            "--data.synthetic.num_train=16", f"--ckpt_path={lora_checkpoint}"]
    code, err = _run_cli(base + args, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ckpt_path: ") and message in last, err[-3000:]
    assert "Traceback" not in err


def test_harmless_changes_resume(lora_checkpoint, tmp_path):
    """Another max_steps, learning rate or logging: the resume goes on (to step 2), without Lightning's warning that
    the loader is not resumable."""
    import warnings

    from sstoken_pl.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", CONFIG, "--config", os.path.join(METHODS, "sstoken_ema.yaml"), "--model.lora.r=4",
          "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--model.export=false", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", "--model.lr=1e-3",
              "--trainer.log_every_n_steps=5", "--data.synthetic.num_train=16", f"--ckpt_path={lora_checkpoint}"])
    assert list(tmp_path.glob("checkpoints/*step=2.ckpt")), "the run went on to step 2"
    assert not [w for w in caught if "not resumable" in str(w.message)]


# ---------------------------------------------------------------------------------------------------- empty batches
def test_batches_with_no_response_token_or_nothing_kept_are_counted_not_nan(tiny_llama):
    """A batch whose every response token was truncated away, and one where selection keeps nothing: finite loss and
    weights, each counted in ``train/empty_batches``."""
    from sstoken_pl.callbacks import TokenSelection
    from sstoken_pl.methods import Method, register_method
    from tests.helpers import ForeignModule, loader, random_batches, trainer

    batches = random_batches(4)
    batches[1]["labels"][:] = -100  # every response token truncated away
    drop_all = Method("drop_all_test", inputs=lambda options: frozenset({"nll"}),
                      score=lambda inputs, mask, options, generator: torch.full_like(inputs["nll"], -torch.inf),
                      rule="batch_top")
    register_method(drop_all)

    class Losses(pl.Callback):
        losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    for method, expected in (("random", 1), ("drop_all_test", 4)):
        selection = TokenSelection(method=method, ratio=0.5)
        Losses.losses = []
        t = trainer(max_steps=4, callbacks=[selection, Losses()])
        module = ForeignModule(tiny_llama)
        t.fit(module, train_dataloaders=loader(batches))
        assert all(torch.isfinite(torch.tensor(Losses.losses))), Losses.losses
        assert all(torch.isfinite(p).all() for p in module.model.parameters())
        assert selection.empty_batches == expected
        assert float(t.callback_metrics["train/empty_batches"]) == expected
