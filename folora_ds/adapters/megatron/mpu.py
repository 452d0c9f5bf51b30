"""The model-parallel unit (``mpu``) DeepSpeed takes from Megatron, for megatron-core's ``parallel_state``.

DeepSpeed reads its groups from an ``mpu`` object: ZeRO partitions and reduces over
``get_data_parallel_group()``, and the gradient norm is summed over ``get_model_parallel_group()``. megatron-core
0.16 no longer has the ``get_model_parallel_*`` functions DeepSpeed calls, and passing ``parallel_state`` itself
fails. ``MegatronMpu`` answers them from the tensor-parallel group (pipeline and context parallelism are refused by
name: FoLoRA's statistics and gates are built for data x tensor parallelism)::

    world of 4, TP = 2, DP = 2:      TP groups {0, 1} {2, 3}      DP groups {0, 2} {1, 3}
    rank 2:  get_model_parallel_rank() = 0 (its TP rank)   get_data_parallel_group_ranks() = [0, 2]
"""

from __future__ import annotations

import importlib
from types import ModuleType

from folora_ds.distributed import comm

MEGATRON_CORE_REQUIREMENT = "megatron-core==0.16.1"


def parallel_state() -> ModuleType:
    """megatron-core's ``parallel_state`` (imported on first use).

    Raises:
        ImportError: megatron-core is not installed; the message names the extra that installs it.
    """
    try:
        return importlib.import_module("megatron.core.parallel_state")
    except ImportError as error:
        raise ImportError(f"FoLoRA's Megatron support needs {MEGATRON_CORE_REQUIREMENT}: pip install -e "
                          f'".[megatron]" (after torch; scripts/setup.sh does) ({error})') from error


# DeepSpeed's mpu query → megatron-core's parallel_state function that answers it. "Model parallel" is tensor
# parallel here: pipeline parallelism is refused, so the two groups are the same.
_FORWARDED = {
    **{f"get_{kind}_parallel_{what}": f"get_tensor_model_parallel_{what}"
       for kind in ("tensor_model", "model") for what in ("group", "world_size", "rank")},
    "get_tensor_model_parallel_src_rank": "get_tensor_model_parallel_src_rank",
    **{f"get_data_parallel_{what}": f"get_data_parallel_{what}" for what in ("group", "world_size", "rank")},
}


class MegatronMpu:
    """What DeepSpeed asks of an ``mpu``, answered from megatron-core's initialized ``parallel_state``.

    Raises (constructor):
        RuntimeError: the model-parallel groups are not initialized (``initialize_model_parallel`` first).
        ValueError: pipeline or context parallelism is on (named, with its size).
    """

    def __init__(self) -> None:
        self._state = parallel_state()
        if not self._state.model_parallel_is_initialized():
            raise RuntimeError("Megatron's model-parallel groups are not initialized: call "
                               "megatron.core.parallel_state.initialize_model_parallel(...) before building the mpu")
        for name, size in (("pipeline", self._state.get_pipeline_model_parallel_world_size()),
                           ("context", self._state.get_context_parallel_world_size())):
            if size != 1:
                raise ValueError(f"{name} parallelism of size {size} is not supported by FoLoRA; use tensor and "
                                 "data parallelism only")

    def __getattr__(self, name: str):
        """The group, size and rank queries DeepSpeed makes, forwarded to ``parallel_state`` (``_FORWARDED``)."""
        if name in _FORWARDED:
            return getattr(self._state, _FORWARDED[name])
        raise AttributeError(f"{type(self).__name__} has no {name!r} (FoLoRA supports tensor x data parallelism)")

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group (DeepSpeed's checkpoint peers)."""
        return comm.group_ranks(self.get_data_parallel_group())

    # no pipeline: one stage
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


MPU_METHODS = tuple(f"get_{kind}_parallel_{what}" for kind in ("model", "data") for what in ("rank", "group",
                                                                                             "world_size"))
"""What DeepSpeed calls on an ``mpu`` for ZeRO over the data-parallel group and the model-parallel gradient norm."""


def check_mpu(mpu, tp_size: int) -> None:
    """Before DeepSpeed starts: ``mpu`` fits a model whose LoRA layers are split over ``tp_size`` TP ranks.

    Raises:
        ValueError: a tensor-parallel model without an mpu (DeepSpeed would average the gradients of different
            shards as if they were replicas), an mpu missing one of ``MPU_METHODS`` (named), sequence
            parallelism, or a model-parallel size that is not the model's TP size.
    """
    if mpu is None:
        if tp_size > 1:
            raise ValueError(f"the model's LoRA layers are split over {tp_size} tensor-parallel ranks: pass "
                             "mpu=folora_ds.adapters.megatron.MegatronMpu() so that DeepSpeed reduces and partitions "
                             "over the data-parallel group only")
        return
    missing = [name for name in MPU_METHODS if not callable(getattr(mpu, name, None))]
    if missing:
        raise ValueError(f"the mpu {type(mpu).__name__} lacks {', '.join(missing)}, which DeepSpeed calls; use "
                         "folora_ds.adapters.megatron.MegatronMpu()")
    sequence = getattr(mpu, "get_sequence_parallel_world_size", None)
    if callable(sequence) and sequence() > 1:
        raise ValueError(f"sequence parallelism of size {sequence()} is not supported by FoLoRA's statistics (each "
                         "rank would see a share of the tokens); use tensor and data parallelism only")
    size = mpu.get_model_parallel_world_size()
    if size != tp_size:
        raise ValueError(f"the mpu's model-parallel size is {size} but the model's LoRA layers are split over "
                         f"{tp_size} tensor-parallel rank(s); adapt every parallel linear with LoRAParallelLinear "
                         "under the same parallel_state")
