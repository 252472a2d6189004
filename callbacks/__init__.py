"""Token selection as Lightning callbacks (``sstoken_pl.callbacks``): each one job, each a thin shell over pure functions.

Providers of per-token inputs (each computes its input only when the selection method asks for it), each a
``TokenInputProvider`` (``provides``, ``compute``, a per-batch cache; ``TokenSelection`` prepares them in one fixed
order: other models' forwards first, then the probes of the training forward armed):

- ``HistoryModel``: ``history_nll``, the history model's per-token NLL (base / snapshot / EMA).
- ``ReferenceModel``: ``reference_nll``, a frozen reference model's per-token NLL (Rho-1, TokenCleaning).
- ``AttentionScore``: ``attention``, the attention mass on the prompt, from one layer of the training forward.
- ``SequenceEntropy``: ``sequence_entropy`` and ``attended``, the predictive entropy at every attended position
  (Q-Tuning's uncertainty as the authors' code computes it), from the training forward's hidden states.

The selector:

- ``TokenSelection``: a method's score and rule over those inputs (``sstoken_pl.methods``) → the token mask that
  ``sstoken_pl.token_loss`` applies.

Resuming and interruptions (any Lightning project; the CLI adds both):

- ``ExactResume``: the random generators' states in checkpoints, restored on resume.
- ``SaveOnInterrupt``: SIGTERM / Ctrl-C → a resumable checkpoint at the end of the optimizer step, then stop.

Display (the CLI's default bar):

- ``StepProgressBar``: Rich's bar with ``step: N/max_steps``, no ``Epoch 0/-2``, no ``v_num``.
"""

from sstoken_pl.callbacks.attention import AttentionScore
from sstoken_pl.callbacks.history import HistoryModel
from sstoken_pl.callbacks.progress import StepProgressBar
from sstoken_pl.callbacks.provider import TokenInputProvider
from sstoken_pl.callbacks.reference import ReferenceModel
from sstoken_pl.callbacks.resume import ExactResume, SaveOnInterrupt
from sstoken_pl.callbacks.selection import TokenSelection
from sstoken_pl.callbacks.sequence_entropy import SequenceEntropy

__all__ = ["AttentionScore", "ExactResume", "HistoryModel", "ReferenceModel", "SaveOnInterrupt", "SequenceEntropy", "StepProgressBar",
           "TokenInputProvider", "TokenSelection"]
