"""Statistics across data-parallel ranks: agree on the inputs, reduce sums to their owners, deliver projectors.

    rank 0           rank 1           rank 2                 owners (LPT over d³):  k0 → 0, k1 → 1, k2 → 2
    Σx xᵀ[k0..k2]    Σx xᵀ[k0..k2]    Σx xᵀ[k0..k2]          reduce(k_i) → owner(k_i): one d² per key moves
         └── reduce(k0) → rank 0, reduce(k1) → rank 1, reduce(k2) → rank 2 ──┘  (not an all-reduce)
    owner solves its keys ──► projector (C̃V_k, V_k, g_k) ──send──► only the ranks whose partition holds rows
                                                                     of a module fed by that input

Errors found on one rank (no data, NaN statistics, a failed solve) are gathered and raised on every rank, so
no rank is left waiting in a collective the others never reach.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from folora_ds.distributed import comm
from folora_ds.projector import Projector
from folora_ds.stats import CovarianceCollector, CovarianceSums


class DistributedStatisticsError(ValueError, RuntimeError):
    """Bad input or a failed solve on one or more ranks, reported identically on all of them.

    A ``ValueError`` (the data, model or statistics are at fault) and, as before the controllers were merged, a
    ``RuntimeError``."""


def raise_if_any(local_error: str | None, group=None) -> None:
    """Collective: every rank raises if any rank reports an error (prefixed with the rank when world > 1)."""
    errors = comm.all_gather_objects(local_error, group)
    if len(errors) == 1:
        found = [errors[0]] if errors[0] is not None else []
    else:
        found = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error is not None]
    if found:
        raise DistributedStatisticsError("; ".join(found))


def agree_on_inputs(collector: CovarianceCollector, group=None) -> dict[str, int]:
    """Collective: the input keys and widths, checked identical on every rank.

    Raises:
        DistributedStatisticsError: a rank collected nothing (no data on that rank) or has different LoRA inputs.
    """
    try:
        mine = collector.input_dims()
    except RuntimeError as error:
        mine = {"__error__": str(error)}
    everyone = comm.all_gather_objects(mine, group)
    problems = [f"rank {rank}: {view['__error__']} (no calibration data reached this rank?)"
                for rank, view in enumerate(everyone) if "__error__" in view]
    if problems:
        raise DistributedStatisticsError("; ".join(problems))
    reference = everyone[0]
    for rank, view in enumerate(everyone[1:], start=1):
        if view != reference:
            missing = sorted(set(reference) ^ set(view))[:3]
            raise DistributedStatisticsError(f"rank {rank} has different LoRA inputs than rank 0 (e.g. {missing}"
                                             " or different widths); every rank must adapt the same modules")
    return reference


def reduce_to_owners(collector: CovarianceCollector, source: str, dims: Mapping[str, int],
                     owners: Mapping[str, int], device, group=None) -> dict[str, CovarianceSums]:
    """Collective: sum each key's statistics of ``source`` into its owner. Returns the global sums this rank owns.

    One reduce of the (d, d) sum per key, in the collector's dtype, to its owner, plus one all-reduce of the
    token counts of all keys together (int64, exact). A rank that saw no token of a key contributes zeros.
    """
    me = comm.rank(group)
    local = collector.sums(source)
    tokens = torch.zeros(len(dims), dtype=torch.int64, device=device)
    owned = {}
    for index, (key, dim) in enumerate(dims.items()):
        sums = local.get(key)
        if sums is not None:
            matrix = sums.sum.clone()
            tokens[index] = sums.tokens.to(device)
        else:
            matrix = torch.zeros(dim, dim, dtype=collector.dtype, device=device)
        comm.reduce_sum_to(matrix, owners[key], group)
        if owners[key] == me:
            owned[key] = matrix
    comm.all_reduce_sum(tokens, group)
    keys = list(dims)
    return {key: CovarianceSums(matrix, tokens[keys.index(key)].clone()) for key, matrix in owned.items()}


def statistics_bytes_per_refresh(dims: Mapping[str, int], element_bytes: int) -> int:
    """Bytes of covariance sums one rank contributes to a refresh (Σ d² · element size, token counts aside)."""
    return sum(dim * dim for dim in dims.values()) * element_bytes


def deliver_projectors(projectors: Mapping[str, Projector], owners: Mapping[str, int], needed: set[str],
                       shapes: Mapping[str, tuple[int, int]], device, group=None) -> dict[str, Projector]:
    """Collective: each owner sends its keys' projectors only to the ranks that need them.

    Args:
        projectors: the projectors this rank owns (key → projector).
        needed: the keys this rank needs.
        shapes: (d, k) of every key's projector (the same on every rank).

    Returns:
        The projectors of every key in ``needed``.
    """
    me = comm.rank(group)
    needs = comm.all_gather_objects(sorted(needed), group)
    received = {}
    for key in sorted(shapes):
        owner = owners[key]
        d, k = shapes[key]
        for rank, rank_needs in enumerate(needs):
            if key not in rank_needs:
                continue
            if rank == owner:
                if rank == me:
                    received[key] = projectors[key]
                continue
            if me == owner:
                projector = projectors[key]
                base = projector.gates.new_tensor([projector.base])
                gates_and_base = torch.cat([projector.gates, base]).float()
                comm.send_tensors([projector.c_tilde_v.float(), projector.v.float(), gates_and_base], rank, group)
            elif me == rank:
                c_tilde_v, v, gates_and_base = comm.receive_tensors([(d, k), (d, k), (k + 1,)], torch.float32, owner,
                                                                    device, group)
                received[key] = Projector(c_tilde_v, v, gates_and_base[:k], float(gates_and_base[k]))
    return received
