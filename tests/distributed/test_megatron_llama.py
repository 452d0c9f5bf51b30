"""``ParallelLlamaForCausalLM`` at TP = 2 computes what the Hugging Face Llama it was sliced from computes (grouped-
query attention, RoPE, right padding), and a TP size that does not divide the heads is refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")

from folora_ds.adapters.megatron import parallel_state  # noqa: E402
from folora_ds.adapters.megatron.llama import check_tensor_parallel_fits, parallel_llama_from_hf  # noqa: E402
from folora_ds.training.models import build_tiny_llama  # noqa: E402
from tests.testing.ranks import run_ranks  # noqa: E402


def _logits(rank: int, world: int) -> dict:
    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        hf = build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                              seed=1)
        model = parallel_llama_from_hf(hf, lora_rank=4, lora_alpha=8, targets=["q_proj", "o_proj", "down_proj"])
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask).logits
            logits = model(ids, mask).logits
        return {"difference": float((logits - expected)[mask.bool()].abs().max()),
                "lora": sorted(name for name, p in model.named_parameters() if p.requires_grad),
                "local_q": tuple(model.model.layers[0].self_attn["q_proj"].base.weight.shape)}
    finally:
        state.destroy_model_parallel()


def test_tp2_llama_computes_the_hugging_face_logits():
    for result in run_ranks(2, _logits):
        assert result["difference"] < 1e-5
        assert result["local_q"] == (16, 32)  # 2 of 4 heads of 8 on each TP rank
        assert len(result["lora"]) == 2 * 3 * 2  # A and B of q/o/down in 2 layers, nothing else trainable


@pytest.mark.parametrize(("heads", "kv_heads", "ffn", "name"), [(6, 2, 48, "num_attention_heads=6"),
                                                                 (4, 1, 48, "num_key_value_heads=1"),
                                                                 (4, 4, 50, "intermediate_size=50")])
def test_a_tp_size_that_does_not_divide_the_heads_or_widths_is_refused(heads, kv_heads, ffn, name):
    config = LlamaConfig(hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=ffn)
    with pytest.raises(ValueError, match=f"tensor-parallel size 4 does not divide {name}"):
        check_tensor_parallel_fits(config, 4)
