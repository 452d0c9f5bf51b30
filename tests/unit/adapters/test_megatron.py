"""``folora_ds.adapters.megatron`` without a process group: megatron-core is optional and its absence is named with
the extra that installs it; an mpu before Megatron's groups exist is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from folora_ds.adapters.megatron import MEGATRON_CORE_REQUIREMENT, LoRAParallelLinear, MegatronMpu, parallel_state


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
