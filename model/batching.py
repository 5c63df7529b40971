"""Token-budget batching: a pure function from sequence lengths to index groups.

Batching policy is not model code (TEI's queue knows one fact about the model: padded or packed).
Sorting by length before cutting keeps padding low on padded backends and makes packed batches
uniform in cost; callers restore input order afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence


def batch_cost(lengths: Sequence[int], *, padded: bool) -> int:
    """Tokens the forward pass computes for one batch: rows x longest when padded, the sum when packed."""
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if padded else sum(lengths)


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    padded: bool,
    max_rows: int | None = None,
    min_fill: float = 0.0,
) -> list[list[int]]:
    """Group indices into batches whose computed tokens stay within `max_tokens`.

    Indices are visited longest first, so each batch holds similar lengths. With `padded` and
    `min_fill`, a batch also closes before real/computed tokens would fall below `min_fill`, which
    bounds padding waste by construction where lengths are sparse. An input longer than the budget
    forms a batch of its own (never an error, never dropped). Every index appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    total = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        new_longest = max(longest, n)
        new_cost = new_longest * (len(current) + 1) if padded else total + n
        full = max_rows is not None and len(current) >= max_rows
        underfilled = padded and (total + n) < min_fill * new_cost
        if current and (new_cost > max_tokens or full or underfilled):
            batches.append(current)
            current, longest, total = [], 0, 0
            new_longest = n
        current.append(i)
        longest = max(longest, n)
        total += n
    if current:
        batches.append(current)
    return batches
