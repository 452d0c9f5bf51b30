"""FoLoRA with Megatron tensor parallelism (megatron-core, the optional ``megatron`` extra).

Built so far:
- ``LoRAParallelLinear``: LoRA on Column/RowParallelLinear in the peft/NeMo layouts.
- ``MegatronMpu``: the model-parallel unit DeepSpeed reads its groups from (ZeRO partitions and reduces over the
  data-parallel group only).
- ``parallel_state()``: the lazy import of megatron-core, with an error that says how to install it.
- ``check_mpu``: the mpu ``folora_ds.initialize(..., mpu=...)`` passes to DeepSpeed fits the model's TP layers.

The gate of a LoRA-A split along d_in is ``method.projector``'s ``apply_projector_shard``. Megatron is imported only
when one of these is used: the package and its tests run without it.
"""

from folora_ds.adapters.megatron.lora import LoRAParallelLinear
from folora_ds.adapters.megatron.mpu import (
           MEGATRON_CORE_REQUIREMENT,
           MPU_METHODS,
           MegatronMpu,
           check_mpu,
           parallel_state,
)

__all__ = ["MEGATRON_CORE_REQUIREMENT", "MPU_METHODS", "LoRAParallelLinear", "MegatronMpu", "check_mpu",
           "parallel_state"]
