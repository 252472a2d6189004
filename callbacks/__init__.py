"""ssToken as Lightning callbacks (``sstoken_pl.callbacks``): each one job, each a thin shell over pure functions.

- ``HistoryModel``: per-token NLL of the history model (base / snapshot / EMA) for each training batch.
- ``AttentionScore``: per-token attention mass on the prompt, from one layer of the training forward.
- ``TokenSelection``: combines them (``sstoken_pl.selection``) into the token mask ``sstoken_pl.token_loss`` applies.
"""

from sstoken_pl.callbacks.attention import AttentionScore
from sstoken_pl.callbacks.history import HistoryModel
from sstoken_pl.callbacks.selection import TokenSelection

__all__ = ["AttentionScore", "HistoryModel", "TokenSelection"]
