"""Statistics across data-parallel ranks: agree on the inputs, send token rows to their owners, deliver projectors.

    rank 0           rank 1           rank 2                 owners (LPT over d³):  k0 → 0, k1 → 1, k2 → 2
    rows x[k0..k2]   rows x[k0..k2]   rows x[k0..k2]         each forward, each input: gather(rows of k_i) → owner
         └── gather(k0) → rank 0, gather(k1) → rank 1, gather(k2) → rank 2 ──┘   (token rows move, never d × d)
    Σx xᵀ[k0]        Σx xᵀ[k1]        Σx xᵀ[k2]              only owners hold (d, d) sums
    owner solves its keys ──► projector (C̃V_k, V_k, g_k) ──send──► only the ranks whose partition holds rows
                                                                     of a module fed by that input

Errors found on one rank (no data, NaN statistics, a failed solve) are gathered and raised on every rank, so
no rank is left waiting in a collective the others never reach.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from folora_ds.distributed import comm
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.method.projector import Projector


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


EXCHANGE_BUFFER_BYTES = 256 * 2**20
"""Most bytes one gather of token rows lands on an owner (world × rows × d × element size); longer row blocks go in
several gathers, so exact statistics of long micro-batches on many ranks stay within bounded buffers."""


def rows_per_gather(world: int, dim: int, element_bytes: int, budget: int | None = None) -> int:
    """Rows each rank sends in one gather so that the owner receives at most ``budget`` bytes (default
    ``EXCHANGE_BUFFER_BYTES``; at least one row)."""
    return max(1, (EXCHANGE_BUFFER_BYTES if budget is None else budget) // (world * dim * element_bytes))


class OwnerRowExchange:
    """Sends the counted token rows of each input to the input's owner, inside the forward (a ``RowExchange``).

    Per collecting forward: one all-gather of every rank's row count n_r; then per input, gathers of the rows,
    zero-padded to max n_r (zero rows add nothing to Σ x xᵀ), to the owner, in blocks of ``rows_per_gather``
    rows so that an owner never receives more than ``EXCHANGE_BUFFER_BYTES`` at once. Only owners hold (d, d)
    sums. Traffic per forward and rank: Σ_inputs max n_r · d · element bytes, of which (world − 1)/world leaves.

    Attributes:
        bytes_sent: what this rank handed to other ranks (padding included), for benchmarks and plans.
    """

    def __init__(self, owners: Mapping[str, int], group=None) -> None:
        self.owners = dict(owners)
        self.group = group
        self.me = comm.rank(group)
        self.world = comm.world_size(group)
        self._counts: list[int] = []
        self.bytes_sent = 0

    def begin_forward(self, rows: int, device) -> None:
        self._counts = comm.all_gather_counts(rows, device, self.group)

    def route(self, key: str, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        owner = self.owners.get(key)
        if owner is None:
            raise RuntimeError(f"input {key!r} has no owner: the inputs changed after the owners were chosen")
        if self.world == 1:
            yield rows
            return
        width = max(self._counts)
        block = rows_per_gather(self.world, rows.shape[1], rows.element_size())
        for start in range(0, width, block):
            stop = min(start + block, width)
            padded = rows.new_zeros(stop - start, rows.shape[1])
            mine = rows[start:stop]
            padded[:mine.shape[0]] = mine
            if owner != self.me:
                self.bytes_sent += padded.numel() * padded.element_size()
            pieces = comm.gather_to(padded, owner, self.group)
            for piece, count in zip(pieces or [], self._counts):
                if count > start:
                    yield piece[:count - start]


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
