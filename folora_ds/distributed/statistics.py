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
from folora_ds.distributed.tensor_parallel import TensorParallelLayout, chunk_bounds
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.method.projector import Projector, projector_shard


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

    Under tensor parallelism (``layout``, and ``kinds`` naming each input's TP kind) the TP ranks of one replica
    hold the same tokens::

        "column" input (whole and identical on every TP rank): each TP rank sends its 1/TP share of the rows,
                 so every token is counted once per replica, and the sending is spread over the TP ranks
        "row" input (split along d): each TP rank sends its (n, d / TP) column block; the owner joins the
                 blocks of a replica in TP order into whole (n, d) rows (the exact statistic, no approximation)

    Attributes:
        bytes_sent: what this rank handed to other ranks (padding included), for benchmarks and plans.
    """

    def __init__(self, owners: Mapping[str, int], group=None, *, layout: TensorParallelLayout | None = None,
                 kinds: Mapping[str, str] | None = None) -> None:
        self.owners = dict(owners)
        self.group = group
        self.me = comm.rank(group)
        self.world = comm.world_size(group)
        self.layout = layout
        self.kinds = dict(kinds or {})
        if self.kinds and (layout is None or layout.tp_size == 1):
            raise ValueError("tensor-parallel inputs need a TensorParallelLayout with TP > 1")
        self._replicas = layout.members() if self.kinds else []  # once: route() runs in every forward hook
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
        kind, counts = self.kinds.get(key), self._counts
        if kind == "column":  # identical on the TP ranks of a replica: each sends its share
            layout = self.layout
            counts = [stop - start for start, stop in (chunk_bounds(count, tp_rank, layout.tp_size)
                                                       for count, tp_rank in zip(counts, layout.tp_ranks))]
            start, stop = chunk_bounds(rows.shape[0], layout.tp_rank, layout.tp_size)
            rows = rows[start:stop]
        elif kind == "row":
            self._check_replicas_agree(key)
        for pieces in self._gather_blocks(rows, counts, owner):
            if kind == "row":  # join each replica's column blocks, in TP order, into whole rows
                pieces = [torch.cat([pieces[rank] for rank in replica], dim=1) for replica in self._replicas]
            yield from (piece for piece in pieces if piece.shape[0])

    def _check_replicas_agree(self, key: str) -> None:
        for replica in self._replicas:
            counted = {self._counts[rank] for rank in replica}
            if len(counted) > 1:
                raise RuntimeError(f"input {key!r} is split over the tensor-parallel ranks {replica}, which counted "
                                   f"different tokens {sorted(counted)}: the TP ranks of a replica must run the same "
                                   "batches with the same masks")

    def _gather_blocks(self, rows: torch.Tensor, counts: list[int], owner: int) -> Iterator[list[torch.Tensor]]:
        """Gathers of every rank's rows (``counts[r]`` of them) to ``owner`` in bounded blocks; yields, on the owner,
        each block's piece from every rank (trimmed to its real rows) and nothing elsewhere."""
        width = max(counts)
        block = rows_per_gather(self.world, rows.shape[1], rows.element_size())
        for start in range(0, width, block):
            stop = min(start + block, width)
            padded = rows.new_zeros(stop - start, rows.shape[1])
            mine = rows[start:stop]
            padded[:mine.shape[0]] = mine
            if owner != self.me:
                self.bytes_sent += padded.numel() * padded.element_size()
            pieces = comm.gather_to(padded, owner, self.group)
            if pieces is not None:
                yield [piece[:max(0, min(count - start, stop - start))] for piece, count in zip(pieces, counts)]


def deliver_projectors(projectors: Mapping[str, Projector], owners: Mapping[str, int],
                       needed: Mapping[str, tuple[int, int]], shapes: Mapping[str, tuple[int, int]], device,
                       group=None) -> dict[str, Projector]:
    """Collective: each owner sends its keys' projectors only to the ranks that need them, and of each only the
    rows a rank needs (a row-parallel LoRA-A under tensor parallelism holds d / TP columns of the input).

    Args:
        projectors: the projectors this rank owns (key → projector).
        needed: the keys this rank needs → the rows [start, stop) of the stored directions it needs ((0, d): all).
        shapes: (d, k) of every key's projector (the same on every rank).

    Returns:
        The projectors of every key in ``needed``, each of d = stop − start (``projector.projector_shard``).
    """
    me = comm.rank(group)
    needs = comm.all_gather_objects({key: tuple(rows) for key, rows in sorted(needed.items())}, group)
    received = {}
    for key in sorted(shapes):
        owner = owners[key]
        _, k = shapes[key]
        for rank, rank_needs in enumerate(needs):
            if key not in rank_needs:
                continue
            start, stop = rank_needs[key]
            if rank == owner:
                if rank == me:
                    received[key] = _rows(projectors[key], start, stop)
                continue
            if me == owner:
                projector = _rows(projectors[key], start, stop)
                base = projector.gates.new_tensor([projector.base])
                gates_and_base = torch.cat([projector.gates, base]).float()
                comm.send_tensors([projector.c_tilde_v.float(), projector.v.float(), gates_and_base], rank, group)
            elif me == rank:
                rows = stop - start
                c_tilde_v, v, gates_and_base = comm.receive_tensors([(rows, k), (rows, k), (k + 1,)], torch.float32,
                                                                    owner, device, group)
                received[key] = Projector(c_tilde_v, v, gates_and_base[:k], float(gates_and_base[k]))
    return received


def _rows(projector: Projector, start: int, stop: int) -> Projector:
    return projector if (start, stop) == (0, projector.dim) else projector_shard(projector, start, stop)
