"""``python -m sstoken_pl fit|validate|test --config ...``: LightningCLI over ``SFTModule`` and ``SFTDataModule``.

Errors caused by the user's input (``SSTokenError``: configs, data files, model paths) are printed as one line
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from sstoken_pl.errors import ConfigError, SSTokenError


class SSTokenCLI(LightningCLI):
    """LightningCLI with the held-out answer-accuracy evaluation under the ``eval`` key."""

    def add_arguments_to_parser(self, parser) -> None:
        from sstoken_pl.evaluation import AnswerAccuracy

        parser.add_lightning_class_args(AnswerAccuracy, "eval")
        parser.set_defaults({"eval.num_problems": 0})

    def instantiate_trainer(self, **kwargs):
        from sstoken_pl.callbacks import AttentionScore, HistoryModel, ReferenceModel, TokenSelection

        # Before the Trainer exists: Lightning would refuse two stateful callbacks of a kind with a traceback.
        # `_get` reads the trainer config with or without a subcommand (`run=False`, as tools/bench_step.py uses).
        callbacks = kwargs.get("callbacks") or self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        for kind in (HistoryModel, AttentionScore, ReferenceModel, TokenSelection):
            if sum(isinstance(cb, kind) for cb in callbacks) > 1:
                raise ConfigError(
                    f"trainer.callbacks has more than one {kind.__name__}: a method config (configs/methods/) was "
                    f"composed with a config that already has one (configs/quickstart.yaml includes ssToken's "
                    f"callbacks; use --trainer.callbacks=[] before the method config to replace them)"
                )
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters while parsing: check the file before it does
        if self.config.get("subcommand"):
            check_checkpoint(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()


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

    try:
        SSTokenCLI(
            SFTModule,
            SFTDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except Exception as err:  # noqa: BLE001 - only user-input errors are turned into one line
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


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
        stack += [e.__cause__, e.__context__]
    return None
