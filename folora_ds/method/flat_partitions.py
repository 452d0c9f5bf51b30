"""Gating LoRA-A updates that live in flat, row-cutting partitions (DeepSpeed ZeRO 1/2/3). Pure torch.

DeepSpeed hands the client optimizer 1-D fp32 partitions. A LoRA-A weight (r, d) flattened row-major may start
or end in the middle of a row on a rank:

    LoRA-A "q" (r=3, d=8), 24 elements, 2 ranks cutting at element 12:

        row 0: [ 0  1  2  3  4  5  6  7 ]   rank 0
        row 1: [ 8  9 10 11|12 13 14 15 ]   rank 0 | rank 1     ← a cut row
        row 2: [16 17 18 19 20 21 22 23 ]   rank 1

    rank 0 flat partition: [... q[0:12] ...]    Fragment(name="q", start=0,  numel=12, offset=…)
    rank 1 flat partition: [... q[12:24] ...]   Fragment(name="q", start=12, numel=12, offset=…)

The gate is linear in the row: its spectral coordinates c = u·C̃V_k are the SUM over the pieces of the row of
u_piece · (C̃V_k)[cols of piece]. So whole rows are gated locally, and a cut row needs only its k coordinates
summed across ranks (one all-reduce of k numbers per cut row for all modules at once), after which every rank
finishes its own piece: base·u_piece + (c ⊙ (g_k − base)) · V_k[cols of piece]ᵀ (base = 1 for the usual
truncation; see ``Projector``). Exact, and far below the cost of
moving rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from folora_ds.method.projector import Projector, apply_projector, gate_with_coordinates, projector_shard

RowKey = tuple[str, int]
"""(LoRA-A name, row index): identifies one row across ranks."""

CutRow = tuple[str, int, int]
"""(LoRA-A name, row index, k of its projector): one row split across ranks, and its coordinate count."""


@dataclass(frozen=True)
class Fragment:
    """The elements [start, start + numel) of the flattened LoRA-A ``name`` (rows × cols), at ``offset`` in a flat
    partition."""

    name: str
    rows: int
    cols: int
    start: int
    numel: int
    offset: int

    def __post_init__(self) -> None:
        if self.numel < 1 or self.start < 0 or self.start + self.numel > self.rows * self.cols or self.offset < 0:
            raise ValueError(f"fragment of {self.name!r} [{self.start}, {self.start + self.numel}) does not fit a "
                             f"({self.rows}, {self.cols}) weight at flat offset {self.offset}")

    def full_rows(self) -> tuple[int, int, int]:
        """(first row, end row, flat offset) of the whole rows inside the fragment (first == end if none)."""
        first = -(-self.start // self.cols)
        end = (self.start + self.numel) // self.cols
        if end <= first:
            return first, first, self.offset
        return first, end, self.offset + first * self.cols - self.start

    def partial_rows(self) -> list[tuple[int, int, int, int]]:
        """(row, first col, end col, flat offset) for each row only partly inside the fragment (at most 2)."""
        pieces = []
        stop = self.start + self.numel
        head_row, head_col = divmod(self.start, self.cols)
        if head_col != 0 or stop < (head_row + 1) * self.cols:
            end_col = min(self.cols, stop - head_row * self.cols)
            pieces.append((head_row, head_col, end_col, self.offset))
        tail_row, tail_col = divmod(stop, self.cols)
        if tail_col != 0 and tail_row != head_row:
            pieces.append((tail_row, 0, tail_col, self.offset + tail_row * self.cols - self.start))
        return pieces


def local_cut_rows(fragments: Sequence[Fragment]) -> list[RowKey]:
    """Rows of which this rank holds only a part (each must be one of the globally cut rows)."""
    return [(fragment.name, row) for fragment in fragments for row, *_ in fragment.partial_rows()]


def gate_flat_update(
    update: torch.Tensor,
    fragments: Sequence[Fragment],
    projectors: Mapping[str, Projector],
    cut_rows: Sequence[CutRow],
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor],
    *,
    split_names: frozenset[str] = frozenset(),
    sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Gate, in place, the LoRA-A parts of a flat Adam update.

    Args:
        update: (n,) flat update of this rank's partition; elements outside ``fragments`` are left alone.
        fragments: the LoRA-A pieces in this partition.
        projectors: projector per LoRA-A name in ``fragments`` (ranks need none for rows they hold no piece of).
        cut_rows: the globally cut rows with their projector rank k, identical and identically ordered on every
            rank of the group.
        sum_across_ranks: sums a (Σ k,) float tensor over the ranks of the group (called only when
            ``cut_rows`` is non-empty, and then on every rank — also ranks holding no piece of a cut row).
        split_names: LoRA-A weights that are themselves column blocks of a wider A (a row-parallel layer under
            tensor parallelism; their projectors are the matching ``projector_shard``): every row's coordinates,
            whole or cut, are partial and summed over the blocks with ``sum_over_shards`` — one call per partition
            and step, made when this partition holds a piece of such a weight or a cut row of one (the ranks
            holding the other blocks have the same partition layout, so they call it alike).
    """
    if split_names and sum_over_shards is None:
        raise ValueError(f"LoRA-A weights {sorted(split_names)[:2]} are split along d_in but no sum over their "
                         "blocks was given")
    partial: list[tuple[torch.Tensor, Projector, int, int, int]] = []  # (piece view, projector, c0, c1, slot)
    split_blocks: list[tuple[torch.Tensor, Projector]] = []  # whole rows of split weights: gated after the sum
    slot_of: dict[RowKey, int] = {}
    width_of = {(name, row): rank_k for name, row, rank_k in cut_rows}
    width = 0
    for name, row, rank_k in cut_rows:
        slot_of[(name, row)] = width
        width += rank_k
    for fragment in fragments:
        projector = projectors.get(fragment.name)
        if projector is None:
            raise RuntimeError(f"no projector for {fragment.name!r}: its update would go ungated")
        if projector.dim != fragment.cols:
            raise ValueError(f"projector for {fragment.name!r} has d={projector.dim}, the weight has "
                             f"{fragment.cols} columns")
        first, end, offset = fragment.full_rows()
        if end > first:
            block = update[offset:offset + (end - first) * fragment.cols].view(end - first, fragment.cols)
            if fragment.name in split_names:
                split_blocks.append((block, projector))
            else:
                block.copy_(apply_projector(block, projector))
        for row, col_start, col_end, piece_offset in fragment.partial_rows():
            key = (fragment.name, row)
            if key not in slot_of:
                raise RuntimeError(f"row {row} of {fragment.name!r} is cut on this rank but not in the global "
                                   "cut-row list; the partition layout is inconsistent across ranks")
            piece = update[piece_offset:piece_offset + (col_end - col_start)]
            if width_of[key] != projector.rank:
                raise RuntimeError(f"cut row {key} declared with k={width_of[key]} but its projector has "
                                   f"k={projector.rank}")
            partial.append((piece, projector, col_start, col_end, slot_of[key]))
    coordinates = torch.zeros(width, dtype=update.dtype, device=update.device)
    if cut_rows:
        for piece, projector, col_start, col_end, slot in partial:
            coordinates[slot:slot + projector.rank] += piece @ projector.c_tilde_v[col_start:col_end]
        coordinates = sum_across_ranks(coordinates)
    block_coordinates = _sum_split_coordinates(split_blocks, coordinates, cut_rows, slot_of, split_names,
                                               sum_over_shards)
    for (block, projector), block_coordinate in zip(split_blocks, block_coordinates):
        block.copy_(gate_with_coordinates(block, block_coordinate, projector))
    for piece, projector, col_start, col_end, slot in partial:  # u_piece·base + (c ⊙ (g − base))·V[cols]ᵀ
        piece.copy_(gate_with_coordinates(piece, coordinates[slot:slot + projector.rank],
                                          projector_shard(projector, col_start, col_end)))


def _sum_split_coordinates(split_blocks: list[tuple[torch.Tensor, Projector]], coordinates: torch.Tensor,
                           cut_rows: Sequence[CutRow], slot_of: Mapping[RowKey, int], split_names: frozenset[str],
                           sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None) -> list[torch.Tensor]:
    """The whole coordinates of the split weights' rows: their partial coordinates (whole rows here, then the cut
    rows' coordinates already summed over the partition's ranks) in one tensor, summed over the blocks once; the
    cut rows' slots of ``coordinates`` are overwritten with the sums. Returns the whole rows' (rows, k) sums."""
    block_partials = [block @ projector.c_tilde_v for block, projector in split_blocks]
    split_cut = [(slot_of[(name, row)], rank_k) for name, row, rank_k in cut_rows if name in split_names]
    if not block_partials and not split_cut:
        return []
    flat = torch.cat([*(partial.flatten() for partial in block_partials),
                      *(coordinates[slot:slot + rank_k] for slot, rank_k in split_cut)])
    flat = sum_over_shards(flat)
    sums, start = [], 0
    for partial in block_partials:
        sums.append(flat[start:start + partial.numel()].view_as(partial))
        start += partial.numel()
    for slot, rank_k in split_cut:
        coordinates[slot:slot + rank_k] = flat[start:start + rank_k]
        start += rank_k
    return sums
