"""``python -m sstoken_pl fit|validate|test --config ...``: LightningCLI over ``SFTModule`` and ``SFTDataModule``.

Errors caused by the user's input (``SSTokenError``: configs, data files, model paths) are printed as one line
and exit with status 2, without a traceback.

Resuming (``fit --ckpt_path``) continues exactly where the checkpoint was written, also mid-epoch: checkpoints are
written atomically (``AtomicCheckpointIO``), carry the random generators' states (``ExactResume``) and the training
data position (``SFTDataModule.state_dict``), and SIGTERM / Ctrl-C write one before stopping (``SaveOnInterrupt``,
options under ``interrupt``). A checkpoint whose saved state does not fit this run's config (another model, LoRA
shape, history mode or selection method) is refused with one clear error; the run's config is not replaced by the
checkpoint's hyper-parameters, as LightningCLI would otherwise do silently.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Iterator

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sstoken_pl.errors import ConfigError, SSTokenError


class _Parser(LightningArgumentParser):
    """A parse error prints one usage line, the hint to ``--help`` and the error, not the list of every option."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("prog", "python -m sstoken_pl")
        super().__init__(*args, **kwargs)

    def format_usage(self) -> str:
        return f"usage: {self.prog.replace(' [options]', '')} [-c CONFIG] [--KEY VALUE ...]\n"


class SSTokenCLI(LightningCLI):
    """LightningCLI with the held-out answer-accuracy evaluation under the ``eval`` key, checkpointing on SIGTERM and
    Ctrl-C under the ``interrupt`` key, atomic checkpoints and exact resumes."""

    def add_arguments_to_parser(self, parser) -> None:
        from sstoken_pl.callbacks import SaveOnInterrupt
        from sstoken_pl.evaluation import AnswerAccuracy

        parser.add_lightning_class_args(AnswerAccuracy, "eval")
        parser.set_defaults({"eval.num_problems": 0})
        parser.add_lightning_class_args(SaveOnInterrupt, "interrupt")

    def instantiate_trainer(self, **kwargs):
        from sstoken_pl.callbacks import AttentionScore, ExactResume, HistoryModel, ReferenceModel, TokenSelection

        # Before the Trainer exists: Lightning would refuse two stateful callbacks of a kind with a traceback.
        # `_get` reads the trainer config with or without a subcommand (`run=False`, as tools/bench.py uses).
        callbacks = kwargs.get("callbacks") or self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        for kind in (HistoryModel, AttentionScore, ReferenceModel, TokenSelection):
            if sum(isinstance(cb, kind) for cb in callbacks) > 1:
                raise ConfigError(
                    f"trainer.callbacks has more than one {kind.__name__}: a method config (configs/methods/) was "
                    f"composed with a config that already has one (configs/quickstart.yaml includes ssToken's "
                    f"callbacks; use --trainer.callbacks=[] before the method config to replace them)"
                )
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # a Trainer setting this machine cannot honour: the user's input
            raise ConfigError(f"trainer: {_misconfiguration(err, self._get(self.config_init, 'trainer', default={}))}") from None
        if not any(isinstance(cb, ExactResume) for cb in trainer.callbacks):
            trainer.callbacks.append(ExactResume())  # last: it restores the generators after every other start hook
        use_atomic_checkpoints(trainer)
        return trainer

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Any:
        from lightning.pytorch.callbacks import ProgressBar

        from sstoken_pl.callbacks import StepProgressBar

        _continue_in_run_folder(config, self._get(self.config_init, "ckpt_path"))
        named = config.get("callbacks") or []
        given = [*callbacks, *(named if isinstance(named, list) else [named])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]  # Lightning's default bar, unless the config names one
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters while parsing: check the file before it does
        if not self.config.get("subcommand"):
            return super()._parse_ckpt_path()
        check_checkpoint(self.config[self.config.subcommand].get("ckpt_path"))
        if self.config.subcommand != "fit":
            # validate/test: the model settings default to the checkpoint's, as LightningCLI does
            super()._parse_ckpt_path()
        # fit: the run's own config stays, and before_fit refuses a checkpoint it does not fit (LightningCLI would
        # silently replace the model config by the checkpoint's, so a changed setting would be ignored unseen)

    def before_fit(self) -> None:
        check_resume(self._get(self.config_init, "ckpt_path"), self.model, self.trainer)


def use_atomic_checkpoints(trainer) -> None:
    """Checkpoints written through ``AtomicCheckpointIO`` unless the strategy or the user chose another CheckpointIO."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from sstoken_pl.checkpoint_io import AtomicCheckpointIO

    strategy = trainer.strategy
    if type(getattr(strategy, "_checkpoint_io", None) or strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _callback_state(states: dict, kind: type):
    """The state a callback of ``kind`` saved in a checkpoint's ``callbacks`` (keys: its ``state_key``)."""
    name = kind.__qualname__
    return next((v for k, v in states.items() if str(k) == name or str(k).startswith(name + "{")), None)


def check_resume(path, module, trainer) -> None:
    """``fit --ckpt_path``: one ``ConfigError`` listing what makes the checkpoint's state meaningless for this run —
    another model (source, GGUF file or config), full fine-tuning against LoRA or another LoRA shape (``r``,
    ``target_modules``), a history model added, removed or of another mode, a token-selection method added, removed
    or changed. Anything else (``trainer.max_steps``, logging, learning rate, ...) may change."""
    if not path or not isinstance(path, str) or not os.path.isfile(path):
        return
    import torch

    from sstoken_pl.callbacks import HistoryModel, TokenSelection
    from sstoken_pl.module import SFTModule

    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    problems: list[str] = []
    if isinstance(module, SFTModule):
        saved, now = ckpt.get("hyper_parameters") or {}, module.hparams
        for key in ("model_name_or_path", "gguf_file", "model_config"):
            if saved.get(key) != now.get(key):
                problems.append(f"model.{key} was {saved.get(key)!r}, now {now.get(key)!r}")
        old, new = saved.get("lora"), now.get("lora")
        if (old is None) != (new is None):
            def kind(lora):
                return "full fine-tuning (model.lora: null)" if lora is None else f"LoRA r={lora.get('r')}"

            problems.append(f"trained with {kind(old)}, this run has {kind(new)}")
        elif old is not None:
            for key in ("r", "target_modules"):
                if old.get(key) != new.get(key):
                    problems.append(f"model.lora.{key} was {old.get(key)!r}, now {new.get(key)!r}")
    states = ckpt.get("callbacks") or {}
    callbacks = trainer.callbacks
    history = next((cb for cb in callbacks if isinstance(cb, HistoryModel)), None)
    saved_history = _callback_state(states, HistoryModel)
    if (history is None) != (saved_history is None):
        had = f"HistoryModel(mode={saved_history.get('mode')!r})" if saved_history is not None else "no HistoryModel"
        has = f"HistoryModel(mode={history.mode!r})" if history is not None else "none"
        problems.append(f"trained with {had}, this run has {has}")
    elif history is not None and saved_history.get("mode") != history.mode:
        problems.append(f"HistoryModel.mode was {saved_history.get('mode')!r}, now {history.mode!r}")
    selection = next((cb for cb in callbacks if isinstance(cb, TokenSelection)), None)
    saved_selection = _callback_state(states, TokenSelection)
    old_method = None if saved_selection is None else saved_selection.get("method", "sstoken")
    new_method = None if selection is None else selection.method_name
    if old_method != new_method:
        name = lambda m: "plain SFT (no TokenSelection)" if m is None else f"method {m!r}"  # noqa: E731
        problems.append(f"token selection was {name(old_method)}, now {name(new_method)}")
    if problems:
        raise ConfigError(
            f"ckpt_path: {path} cannot be resumed with this config: {'; '.join(problems)}. Resume with the settings it "
            f"was trained with (the run folder's config.yaml), or start a new run without --ckpt_path"
        )


def check_checkpoint(path) -> None:
    """``ckpt_path`` must be a readable Lightning checkpoint: one clear error naming the file otherwise (a sharded
    checkpoint directory, and Lightning's keywords ``last``/``best``/``hpc``/``registry``, are left to Lightning)."""
    if not path or not isinstance(path, str) or path in ("last", "best", "hpc", "registry") or os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path: no such file {path}")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever breaks the load, the file is the user's input
        raise ConfigError(
            f"ckpt_path: {path} is not a readable PyTorch checkpoint: corrupted, truncated, or not written by "
            f"torch.save ({type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        raise ConfigError(f"ckpt_path: {path} is not a Lightning checkpoint (no state_dict / pytorch-lightning_version)")


# Deprecation chatter from the libraries' own internals, which a user cannot act on.
_QUIET = [
    (FutureWarning, r".*is_gradient_checkpointing.*"),
    (Warning, r".*isinstance\(treespec, LeafSpec\).*"),
]


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message in _QUIET:
        warnings.filterwarnings("ignore", message=message, category=category)
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    with user_errors():
        SSTokenCLI(
            SFTModule,
            SFTDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_class=_Parser,
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Within the block, an error in the user's input ends the program with one ``error:`` line (exit code 2);
    anything else propagates with its traceback."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only user-input errors are turned into one line
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _continue_in_run_folder(config: dict, ckpt_path: Any) -> None:
    """A resume (``fit --ckpt_path``) or a ``validate``/``test`` of a checkpoint of a run's own folder,
    ``<root>/<name>/version_N/checkpoints/*.ckpt``, logs to that run's ``version_N`` (and, for ``fit``, keeps saving
    checkpoints there) instead of starting ``version_N+1``: what a user expects, and Lightning then has no
    "dirpath has changed" to warn about. Only the default logger (``trainer.logger: true``) and a TensorBoard or CSV
    logger with no version of its own, saving under the same root, are pointed there."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not isinstance(ckpt_path, str) or not os.path.isfile(ckpt_path):
        return
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    version_dir = os.path.dirname(folder)
    version = os.path.basename(version_dir)
    if os.path.basename(folder) != "checkpoints" or not version.startswith("version_") or not version[8:].isdigit():
        return
    name_dir = os.path.dirname(version_dir)
    root, name = os.path.dirname(name_dir), os.path.basename(name_dir)
    logger = config.get("logger", True)
    if logger is True or logger is None:
        if os.path.abspath(config.get("default_root_dir") or os.getcwd()) == root and name == "lightning_logs":
            config["logger"] = TensorBoardLogger(save_dir=root, version=int(version[8:]))
        return
    for one in logger if isinstance(logger, list) else [logger]:
        if (isinstance(one, (TensorBoardLogger, CSVLogger)) and one._version is None and one.name == name
                and os.path.abspath(one.save_dir) == root):
            one._version = int(version[8:])


def _misconfiguration(err: Exception, trainer: Any) -> str:
    """Lightning's refusal of a Trainer setting, with the setting and what to do where Lightning's message lacks it."""
    message = str(err).strip()
    accelerator = str((trainer or {}).get("accelerator") or "")
    if "No supported gpu backend found" in message or (accelerator in ("gpu", "cuda") and "not available" in message):
        return (f"accelerator={accelerator}: no GPU is visible on this machine (torch.cuda.is_available() is False); "
                f"use --trainer.accelerator=cpu (or auto)")
    return message


def _user_error(err: BaseException) -> SSTokenError | None:
    """The ``SSTokenError`` behind ``err``, also when jsonargparse wrapped one raised while instantiating a class."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SSTokenError):
            return e
        if isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e):
            # a checkpoint of another architecture: torch's message lists every mismatch; the first one is enough
            details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            first = details[0] if details else str(e).splitlines()[0]
            return ConfigError(f"ckpt_path: the checkpoint's weights do not fit this model ({first.rstrip('.')})")
        stack += [e.__cause__, e.__context__]
    return None
