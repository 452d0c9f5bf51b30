"""What the controller reads off a model's tensor-parallel LoRA layers: their TP group and grid, each input's TP
kind, and the projector rows each rank's LoRA-A needs.

    input key          its layers' kind   statistics on the owner             projector rows a rank holds
    q_proj (q/k/v in)  column             each token once per replica         all d (A is whole on every TP rank)
    o_proj (o in)      row                TP column blocks joined into rows   its d / TP columns (A's columns)
    peft layer         —                  as without TP                       all d
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from torch import nn

from folora_ds.distributed import comm
from folora_ds.distributed.tensor_parallel import TensorParallelLayout, gather_layout
from folora_ds.method.peft_layers import TensorParallelLoRA, tensor_parallel_kind


def parallel_layout(layers: Mapping[str, nn.Module], group=None) -> TensorParallelLayout:
    """The TP x DP grid of FoLoRA's ``group`` from the model's tensor-parallel LoRA layers: a collective only when
    the model has some (every rank is then asked for its TP group); without them every rank is its own replica.

    Raises:
        ValueError: the tensor-parallel layers use different process groups, or a model mixes them with peft
            LoRA layers (whose whole weights would be trained as independent copies on each TP rank).
    """
    parallel = {name: layer for name, layer in layers.items() if isinstance(layer, TensorParallelLoRA)}
    if not parallel:
        world = comm.world_size(group)
        return TensorParallelLayout(1, (0,) * world, tuple(range(world)), None, comm.rank(group))
    plain = sorted(set(layers) - set(parallel))
    if plain:
        raise ValueError(f"the model mixes tensor-parallel LoRA layers with peft LoRA layers (e.g. {plain[0]!r}); "
                         "adapt every layer of a tensor-parallel model with LoRAParallelLinear")
    groups = {id(layer.tp_group): layer.tp_group for layer in parallel.values()}
    if len(groups) != 1:
        raise ValueError(f"the tensor-parallel LoRA layers use {len(groups)} different process groups; FoLoRA "
                         "supports one tensor-parallel group per rank")
    return gather_layout(next(iter(groups.values())), group)


def input_kinds(layers: Mapping[str, nn.Module], members: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Input key → TP kind ("column" / "row") of the keys whose layers are tensor-parallel.

    Raises:
        ValueError: layers of different kinds share one input (the model's data flow is not Megatron's).
    """
    kinds = {}
    for key, names in members.items():
        found = {tensor_parallel_kind(layers[name]) for name in names}
        if len(found) > 1:
            raise ValueError(f"input {key!r} feeds layers of different tensor-parallel kinds {sorted(map(str, found))}"
                             f" ({', '.join(names)})")
        kind = found.pop()
        if kind is not None:
            kinds[key] = kind
    return kinds


def needed_rows(layers: Mapping[str, nn.Module], names: Iterable[str], key_of: Callable[[str], str],
                dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Input key → the rows [start, stop) of its projector that the LoRA-A of ``names`` (this rank's) need: a
    row-parallel A its own columns of d_in, any other A all d."""
    needed = {}
    for name in names:
        key, layer = key_of(name), layers[name]
        needed[key] = (tuple(layer.local_columns) if tensor_parallel_kind(layer) == "row" else (0, dims[key]))
    return needed
