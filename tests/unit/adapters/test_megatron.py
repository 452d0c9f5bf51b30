"""``folora_ds.adapters.megatron`` without a process group: megatron-core is optional and its absence is named with
the extra that installs it; an mpu before Megatron's groups exist is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from folora_ds.adapters.megatron import (
    MEGATRON_CORE_REQUIREMENT,
    MPU_METHODS,
    LoRAParallelLinear,
    MegatronMpu,
    check_mpu,
    parallel_state,
)


def test_importing_folora_ds_does_not_import_megatron():
    code = "import sys, folora_ds, folora_ds.adapters.megatron; assert 'megatron.core' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)  # a fresh interpreter: only first use imports it


def test_missing_megatron_core_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core.parallel_state", None)  # as if not installed
    with pytest.raises(ImportError, match=r'needs megatron-core==0\.16\.1: pip install -e "\.\[megatron\]"'):
        parallel_state()
    with pytest.raises(ImportError, match="megatron"):
        MegatronMpu()
    assert MEGATRON_CORE_REQUIREMENT == "megatron-core==0.16.1"


def test_an_mpu_before_the_model_parallel_groups_exist_is_refused():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")
    with pytest.raises(RuntimeError, match="model-parallel groups are not initialized"):
        MegatronMpu()


def test_lora_parallel_linear_wraps_only_megatron_parallel_linears_with_a_valid_rank():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")
    with pytest.raises(TypeError, match="wraps megatron-core Column/RowParallelLinear, not Linear"):
        LoRAParallelLinear(nn.Linear(4, 4), rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="rank=0 is invalid"):
        LoRAParallelLinear(nn.Linear(4, 4), rank=0, alpha=4.0)


class _Mpu:
    """An mpu answering DeepSpeed's queries with fixed sizes (``drop``: a method it lacks)."""

    def __init__(self, model_parallel: int = 2, sequence_parallel: int | None = None, drop: str = "") -> None:
        self.model_parallel, self.sequence_parallel, self.drop = model_parallel, sequence_parallel, drop

    def __getattr__(self, name):
        if name == self.drop or not name.startswith("get_"):
            raise AttributeError(name)
        if name == "get_sequence_parallel_world_size":
            if self.sequence_parallel is None:
                raise AttributeError(name)
            return lambda: self.sequence_parallel
        return lambda: self.model_parallel if name == "get_model_parallel_world_size" else 0


def test_an_mpu_that_fits_the_model_passes():
    check_mpu(_Mpu(2), 2)
    check_mpu(_Mpu(2, sequence_parallel=1), 2)
    check_mpu(None, 1)  # no tensor-parallel layers: DeepSpeed's own data parallelism
    check_mpu(_Mpu(1), 1)


@pytest.mark.parametrize(("mpu", "tp_size", "message"), [
    (None, 2, r"split over 2 tensor-parallel ranks: pass mpu=folora_ds\.adapters\.megatron\.MegatronMpu\(\)"),
    (_Mpu(2, drop="get_data_parallel_group"), 2, "_Mpu lacks get_data_parallel_group, which DeepSpeed calls"),
    (_Mpu(2, sequence_parallel=2), 2, "sequence parallelism of size 2 is not supported"),
    (_Mpu(4), 2, "model-parallel size is 4 but the model's LoRA layers are split over 2"),
    (_Mpu(2), 1, "model-parallel size is 2 but the model's LoRA layers are split over 1"),
])
def test_an_mpu_that_does_not_fit_is_refused_by_name(mpu, tp_size, message):
    with pytest.raises(ValueError, match=message):
        check_mpu(mpu, tp_size)
    assert set(MPU_METHODS) == {f"get_{k}_parallel_{w}" for k in ("model", "data") for w in ("rank", "group",
                                                                                              "world_size")}
