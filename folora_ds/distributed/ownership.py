"""Which rank solves which input: largest-cost-first (LPT) balance of d³ solve costs. Pure, deterministic."""

from __future__ import annotations

from collections.abc import Mapping


def assign_owners(dims: Mapping[str, int], world_size: int) -> dict[str, int]:
    """Owner rank per input key, balancing the Σ d³ solve cost per rank.

    Keys are taken in decreasing cost, ties broken by key name, each to the currently least-loaded rank (ties
    to the lowest rank). Every rank computes the same answer from the same ``dims``.

    Raises:
        ValueError: world_size < 1 or a non-positive dimension.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    loads = [0] * world_size
    owners = {}
    for key in sorted(dims, key=lambda k: (-dims[k] ** 3, k)):
        if dims[key] < 1:
            raise ValueError(f"input {key!r} has dimension {dims[key]}")
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[key] = rank
        loads[rank] += dims[key] ** 3
    return owners
