"""Every baseline's peft model: the init leaves the model's output unchanged, and the trained adapter, exported,
loads with plain PeftModel.from_pretrained on the *untouched* base and reproduces the trained model."""

import pytest
import torch
from peft import PeftModel

from folora_ds.method.peft_layers import lora_a_weight, lora_b_weight, lora_layers
from folora_ds.toolkit.methods import (
    METHODS,
    MUTATING_INITS,
    build_peft_model,
    lora_config,
    save_initial_adapter,
    save_trained_adapter,
)
from folora_ds.training.models import load_model

TARGETS = ("q_proj", "v_proj", "down_proj")
INPUT = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61]])


def _covariances(model):
    generator = torch.Generator().manual_seed(1)
    result = {}
    for name, layer in lora_layers(model).items():
        dim = layer.get_base_layer().weight.shape[1]
        x = torch.randn(64, dim, generator=generator)
        y = torch.randn(64, dim, generator=generator) * torch.linspace(0.1, 2, dim)
        result[name] = (x.T @ x / 64, y.T @ y / 64)
    return result


def _peft(method):
    base, _ = load_model("tiny-llama", seed=0)
    with torch.no_grad():
        reference = base(input_ids=INPUT).logits.clone()
    config = lora_config(method, rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    covariances = None
    if method in ("lora-null", "sc-lora"):  # names as peft gives them, from a throwaway wrap of an equal model
        probe, _ = load_model("tiny-llama", seed=0)
        from peft import get_peft_model
        covariances = _covariances(get_peft_model(probe, lora_config("lora", rank=4, alpha=8.0, dropout=0.0,
                                                                     targets=TARGETS)))
    torch.manual_seed(0)
    model = build_peft_model(base, method, config, knowledge_sequences=[[1, 5, 9, 33, 70, 2], [1, 88, 4, 120]],
                             covariances=covariances)
    return model, reference


@pytest.mark.parametrize("method", [m for m in METHODS if m != "folora"])
def test_init_keeps_the_output_and_the_export_loads_on_the_untouched_base(method, tmp_path):
    model, reference = _peft(method)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=INPUT).logits, reference, atol=2e-5, rtol=1e-4)
    if method in MUTATING_INITS:
        save_initial_adapter(model, method, tmp_path / "initial")
        assert any(not torch.equal(lora_b_weight(layer), torch.zeros_like(lora_b_weight(layer)))
                   for layer in lora_layers(model).values())  # the adapter really holds part of W
    with torch.no_grad():  # "training": move every A and B
        generator = torch.Generator().manual_seed(3)
        for layer in lora_layers(model).values():
            for weight in (lora_a_weight(layer), lora_b_weight(layer)):
                weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
        trained = model(input_ids=INPUT).logits.clone()
    assert not torch.allclose(trained, reference, atol=1e-4)
    save_trained_adapter(model, method, tmp_path / "adapter",
                         tmp_path / "initial" if method in MUTATING_INITS else None)
    fresh, _ = load_model("tiny-llama", seed=0)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT).logits, trained, atol=2e-5, rtol=1e-4)
    expected_rank = 8 if method in MUTATING_INITS else 4  # peft's conversion: [A; A0], [B, -B0]
    assert loaded.peft_config["default"].r == expected_rank


def test_methods_refuse_missing_inputs():
    base, _ = load_model("tiny-llama", seed=0)
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        lora_config("dora", rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)
    with pytest.raises(ValueError, match="corda needs"):
        build_peft_model(base, "corda", lora_config("corda", rank=4, alpha=8.0, dropout=0.0, targets=TARGETS))
    base, _ = load_model("tiny-llama", seed=0)
    with pytest.raises(ValueError, match="sc-lora needs the calibration covariances"):
        build_peft_model(base, "sc-lora", lora_config("sc-lora", rank=4, alpha=8.0, dropout=0.0, targets=TARGETS))
    base, _ = load_model("tiny-llama", seed=0)
    with pytest.raises(ValueError, match="no calibration covariances for LoRA module"):
        build_peft_model(base, "lora-null", lora_config("lora-null", rank=4, alpha=8.0, dropout=0.0,
                                                        targets=TARGETS), covariances={})
    model, _ = _peft("milora")
    with pytest.raises(ValueError, match="initial adapter"):
        save_trained_adapter(model, "milora", "/tmp/never", None)
