"""``python -m sstoken_pl fit|validate|test --config ...``: LightningCLI over ``SFTModule`` and ``SFTDataModule``.

Errors caused by the user's input (``SSTokenError``: configs, data files, model paths) are printed as one line
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from sstoken_pl.errors import SSTokenError


class SSTokenCLI(LightningCLI):
    """LightningCLI with the held-out answer-accuracy evaluation under the ``eval`` key."""

    def add_arguments_to_parser(self, parser) -> None:
        from sstoken_pl.evaluation import AnswerAccuracy

        parser.add_lightning_class_args(AnswerAccuracy, "eval")
        parser.set_defaults({"eval.num_problems": 0})


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sstoken_pl.data import SFTDataModule
    from sstoken_pl.module import SFTModule

    try:
        SSTokenCLI(
            SFTModule,
            SFTDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except SSTokenError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
