"""Gating LoRA-A updates split into flat, row-cutting partitions equals gating the whole matrices."""

from __future__ import annotations

import threading

import pytest
import torch

from folora_ds.method.flat_partitions import Fragment, gate_flat_update, local_cut_rows
from folora_ds.method.projector import Projector, apply_projector, projector_shard


def _projector(d: int, k: int, seed: int, base: float = 1.0) -> Projector:
    generator = torch.Generator().manual_seed(seed)
    return Projector(torch.randn(d, k, generator=generator, dtype=torch.float64),
                     torch.randn(d, k, generator=generator, dtype=torch.float64),
                     torch.rand(k, generator=generator, dtype=torch.float64), base)


class _ThreadAllReduce:
    """A sum over threads standing in for ranks; records how many elements each call moved."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.buffers: dict[int, torch.Tensor] = {}
        self.elements: list[int] = []

    def for_rank(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.buffers[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.buffers[r] for r in sorted(self.buffers))
            self.barrier.wait()
            if rank == 0:
                self.elements.append(tensor.numel())
            return total
        return reduce


def _partition(weights: dict[str, torch.Tensor], world: int, padding: int = 0):
    """ZeRO-1/2 style: concatenate, pad, cut into ``world`` equal contiguous chunks; fragments per rank."""
    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    flat = torch.cat([flat, torch.zeros(padding, dtype=flat.dtype)])
    size = -(-flat.numel() // world)
    flat = torch.cat([flat, torch.zeros(size * world - flat.numel(), dtype=flat.dtype)])
    shards, fragments = [], []
    for rank in range(world):
        lo, hi = rank * size, (rank + 1) * size
        shards.append(flat[lo:hi].clone())
        rank_fragments, position = [], 0
        for name, weight in weights.items():
            start, stop = max(lo, position), min(hi, position + weight.numel())
            if start < stop:
                rank_fragments.append(Fragment(name=name, rows=weight.shape[0], cols=weight.shape[1],
                                               start=start - position, numel=stop - start, offset=start - lo))
            position += weight.numel()
        fragments.append(rank_fragments)
    return shards, fragments, size


@pytest.mark.parametrize("base", [1.0, 0.25])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_flat_gating_equals_whole_matrix_gating(world, base):
    """Also with a base gate < 1 (a projector storing the complement of a large tied cluster)."""
    shapes = {"a": (3, 8), "b": (5, 7), "c": (2, 13)}
    generator = torch.Generator().manual_seed(world)
    updates = {name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    projectors = {name: _projector(shape[1], k, seed, base) for (name, shape), k, seed in
                  zip(shapes.items(), (3, 7, 5), (1, 2, 3))}
    expected = {name: apply_projector(update, projectors[name]) for name, update in updates.items()}
    shards, fragments, size = _partition(updates, world)
    cut = sorted({(name, row, projectors[name].rank) for rank_fragments in fragments
                  for name, row in local_cut_rows(rank_fragments)})
    reducer = _ThreadAllReduce(world)
    errors = []

    def run(rank: int) -> None:
        try:
            gate_flat_update(shards[rank], fragments[rank], projectors, cut, reducer.for_rank(rank))
        except Exception as error:  # surfaced below
            errors.append(error)
            reducer.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    gathered = torch.cat(shards)
    position = 0
    for name, update in updates.items():
        torch.testing.assert_close(gathered[position:position + update.numel()].view_as(update), expected[name],
                                   rtol=1e-12, atol=1e-12)
        position += update.numel()
    assert world == 1 or cut, "the shapes must make partitions cut rows, or this test could not fail"
    # one collective per step carrying k coordinates per cut row, never whole rows
    assert reducer.elements == ([sum(k for _, _, k in cut)] if cut else [])


def test_undeclared_cut_row_raises():
    update = torch.randn(3, 8, dtype=torch.float64)
    shards, fragments, _ = _partition({"a": update}, 2)
    with pytest.raises(RuntimeError, match="not in the global cut-row list"):
        gate_flat_update(shards[0], fragments[0], {"a": _projector(8, 4, 0)}, [], lambda t: t)


def test_elements_outside_fragments_are_untouched():
    update = torch.randn(2, 6, dtype=torch.float64)
    flat = torch.cat([torch.full((4,), 7.0, dtype=torch.float64), update.reshape(-1), torch.full((3,), 9.0,
                                                                                              dtype=torch.float64)])
    fragment = Fragment(name="a", rows=2, cols=6, start=0, numel=12, offset=4)
    gate_flat_update(flat, [fragment], {"a": _projector(6, 2, 1)}, [], lambda t: t)
    assert torch.all(flat[:4] == 7.0) and torch.all(flat[16:] == 9.0)
    torch.testing.assert_close(flat[4:16].view(2, 6), apply_projector(update, _projector(6, 2, 1)))


@pytest.mark.parametrize(("start", "numel", "full", "partial"), [
    (0, 24, (0, 3, 0), []),
    (12, 12, (2, 3, 4), [(1, 4, 8, 0)]),
    (4, 16, (1, 2, 4), [(0, 4, 8, 0), (2, 0, 4, 12)]),
    (9, 3, (2, 2, 0), [(1, 1, 4, 0)]),
    (8, 8, (1, 2, 0), []),
])
def test_fragment_row_decomposition(start, numel, full, partial):
    fragment = Fragment(name="a", rows=3, cols=8, start=start, numel=numel, offset=0)
    first, end, offset = fragment.full_rows()
    assert (first, end) == full[:2]
    if end > first:
        assert offset == full[2]
    assert fragment.partial_rows() == partial


def test_fragment_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        Fragment(name="a", rows=2, cols=4, start=6, numel=4, offset=0)


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_a_weight_split_over_tensor_parallel_ranks_is_gated_as_the_whole_weight(dp):
    """TP = 2 x DP = ``dp`` threads: "a" (3, 8) is whole on both TP ranks, "b" (5, 14) is split along d_in into
    7 | 7 column blocks (a row-parallel LoRA-A); each TP rank's flat partitions over DP cut rows of both. Every
    piece equals the same piece of the whole gated update; the sum over TP runs once per partition and step."""
    tp, d_b = 2, 14
    generator = torch.Generator().manual_seed(dp)
    whole = {"a": torch.randn(3, 8, generator=generator, dtype=torch.float64),
             "b": torch.randn(5, d_b, generator=generator, dtype=torch.float64)}
    projectors = {"a": _projector(8, 3, 1), "b": _projector(d_b, 4, 2, base=0.5)}
    expected = {name: apply_projector(update, projectors[name]) for name, update in whole.items()}
    blocks = [(0, 7), (7, d_b)]
    per_tp = [{"a": whole["a"], "b": whole["b"][:, lo:hi]} for lo, hi in blocks]
    shards, fragments, cut = {}, {}, {}
    for t in range(tp):
        shard_list, fragment_list, _ = _partition(per_tp[t], dp)
        for rank in range(dp):
            shards[t, rank], fragments[t, rank] = shard_list[rank], fragment_list[rank]
        cut[t] = sorted({(name, row, projectors[name].rank) for rank_fragments in fragment_list
                         for name, row in local_cut_rows(rank_fragments)})
    over_dp = {t: _ThreadAllReduce(dp) for t in range(tp)}
    over_tp = {rank: _ThreadAllReduce(tp) for rank in range(dp)}
    errors = []

    def run(t: int, rank: int) -> None:
        shard_projectors = {"a": projectors["a"], "b": projector_shard(projectors["b"], *blocks[t])}
        try:
            gate_flat_update(shards[t, rank], fragments[t, rank], shard_projectors, cut[t],
                             over_dp[t].for_rank(rank), split_names=frozenset({"b"}),
                             sum_over_shards=over_tp[rank].for_rank(t))
        except Exception as error:  # surfaced below
            errors.append(error)
            for reducer in (*over_dp.values(), *over_tp.values()):
                reducer.barrier.abort()

    threads = [threading.Thread(target=run, args=(t, rank)) for t in range(tp) for rank in range(dp)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for t, (lo, hi) in enumerate(blocks):
        gathered = torch.cat([shards[t, rank] for rank in range(dp)])
        torch.testing.assert_close(gathered[:24].view(3, 8), expected["a"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gathered[24:24 + 35].view(5, 7), expected["b"][:, lo:hi], rtol=1e-12, atol=1e-12)
    assert dp == 1 or any(name == "b" for name, _, _ in cut[0]), "a row of b must be cut, or this could not fail"
    assert all(len(reducer.elements) == 1 for reducer in over_tp.values())  # one TP sum per partition and step


def test_split_weights_without_a_sum_over_their_blocks_are_refused():
    with pytest.raises(ValueError, match=r"\['b'\] are split along d_in but no sum over their blocks"):
        gate_flat_update(torch.zeros(4), [], {}, [], lambda tensor: tensor, split_names=frozenset({"b"}))
