"""Token selection as Lightning callbacks (``sstoken_pl.callbacks``): each one job, each a thin shell over pure functions.

Providers of per-token inputs (each computes its input only when the selection method asks for it):

- ``HistoryModel``: ``history_nll``, the history model's per-token NLL (base / snapshot / EMA).
- ``ReferenceModel``: ``reference_nll``, a frozen reference model's per-token NLL (Rho-1, TokenCleaning).
- ``AttentionScore``: ``attention``, the attention mass on the prompt, from one layer of the training forward.

The selector:

- ``TokenSelection``: a method's score and rule over those inputs (``sstoken_pl.methods``) → the token mask that
  ``sstoken_pl.token_loss`` applies.
"""

from sstoken_pl.callbacks.attention import AttentionScore
from sstoken_pl.callbacks.history import HistoryModel
from sstoken_pl.callbacks.reference import ReferenceModel
from sstoken_pl.callbacks.selection import TokenSelection

__all__ = ["AttentionScore", "HistoryModel", "ReferenceModel", "TokenSelection"]
