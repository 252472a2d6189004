"""ssToken as Lightning callbacks (``sstoken_pl.callbacks``): each one job, each a thin shell over pure functions.

- ``HistoryModel``: per-token NLL of the history model (base / snapshot / EMA) for each training batch.
- ``AttentionScore``: per-token attention mass on the prompt, from one layer of the training forward.
- ``TokenSelection``: combines them (``sstoken_pl.selection``) into the token mask ``sstoken_pl.token_loss`` applies.
"""

__all__ = ["AttentionScore", "HistoryModel", "TokenSelection"]


def __getattr__(name: str):
    if name == "AttentionScore":
        from sstoken_pl.callbacks.attention import AttentionScore

        return AttentionScore
    if name == "HistoryModel":
        from sstoken_pl.callbacks.history import HistoryModel

        return HistoryModel
    if name == "TokenSelection":
        from sstoken_pl.callbacks.selection import TokenSelection

        return TokenSelection
    raise AttributeError(f"module 'sstoken_pl.callbacks' has no attribute {name!r}")
