"""The methods the comparison grid trains: FoLoRA and the LoRA baselines users would otherwise pick.

Every method is a peft LoRA adapter on the same target modules and rank, trained on the same batches:

| method | init | trained with |
|---|---|---|
| ``lora`` | peft's default (Kaiming A, B = 0) | AdamW |
| ``folora`` | FoLoRA's (projected by default) | gated AdamW (``folora_ds.initialize``); see knobs below |
| ``pissa`` | peft ``init_lora_weights="pissa"`` (top singular triplets moved into the adapter) | AdamW |
| ``corda`` | peft CorDA, knowledge-preserved mode (``corda_method="kpm"``) on the proxy set | AdamW |
| ``milora`` | smallest singular triplets (``baselines.milora_factors``) | AdamW |
| ``lora-null`` | pretraining-activation null space (``baselines.lora_null_factors``) | AdamW |
| ``sc-lora`` | task-vs-knowledge output subspace (``baselines.sc_lora_factors``) | AdamW |

A ``folora`` run's knobs are FoLoRA config fields: variant B, a forgetting budget, or the hard gate — the
hard-projection baseline, the gate's T → 0 limit.

Inits that move part of W into the adapter (``MUTATING_INITS``) change the base weights; their adapters are saved
relative to the *untouched* base with peft's ``path_initial_model_for_weight_conversion`` (a rank-2r LoRA), so
every exported adapter loads with plain ``PeftModel.from_pretrained`` on the original model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from folora_ds.common.files import replace_atomically
from folora_ds.method.peft_layers import base_weight_matrix, lora_a_weight, lora_b_weight, lora_layers, lora_scaling
from folora_ds.toolkit import baselines

METHODS = ("lora", "folora", "pissa", "corda", "milora", "lora-null", "sc-lora")
MUTATING_INITS = ("pissa", "corda", "milora", "lora-null", "sc-lora")
COVARIANCE_INITS = ("lora-null", "sc-lora")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def lora_config(method: str, *, rank: int, alpha: float, dropout: float, targets: str | Sequence[str]) -> LoraConfig:
    """The peft LoRA config of ``method`` (peft's own init for PiSSA and CorDA; the default init otherwise, which
    ``apply_init`` then overwrites for the covariance/SVD baselines)."""
    check_method(method)
    targets = targets if isinstance(targets, str) else list(targets)
    extra = {}
    if method == "pissa":
        extra["init_lora_weights"] = "pissa"
    elif method == "corda":
        from peft.tuners.lora.config import CordaConfig

        extra = {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="kpm")}
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **extra)


def build_peft_model(model, method: str, config: LoraConfig, *,
                     knowledge_sequences: Sequence[Sequence[int]] = (),
                     covariances: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     sc_lora_beta: float = 0.5):
    """Wrap ``model`` with ``method``'s adapter, initialised as the method says.

    Args:
        knowledge_sequences: token ids of the preserved-knowledge set (the proxy set), one unpadded sequence at a
            time for CorDA (its covariance hook ignores attention masks).
        covariances: module name → (C_pre, C_task) input covariances (in, in), for ``lora-null`` / ``sc-lora``.

    Raises:
        ValueError: a method that needs data it was not given, or a module without its covariances.
    """
    check_method(method)
    if method == "corda":
        if not knowledge_sequences:
            raise ValueError("corda needs the knowledge (proxy) sequences to build its covariances")
        from peft.tuners.lora.corda import preprocess_corda

        device = next(model.parameters()).device

        @torch.no_grad()
        def run_model() -> None:
            for ids in knowledge_sequences:
                model(input_ids=torch.tensor([list(ids)], device=device))

        preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    if method in COVARIANCE_INITS:
        if covariances is None:
            raise ValueError(f"{method} needs the calibration covariances (C_pre, C_task) of every LoRA module")
        _apply_covariance_init(peft_model, method, covariances, sc_lora_beta)
    elif method == "milora":
        _apply_factors(peft_model, lambda name, weight, rank, scaling: baselines.milora_factors(weight, rank,
                                                                                                 scaling))
    return peft_model


def _apply_covariance_init(peft_model, method: str, covariances, beta: float) -> None:
    def factors(name, weight, rank, scaling):
        if name not in covariances:
            raise ValueError(f"{method}: no calibration covariances for LoRA module {name!r}")
        c_pre, c_task = covariances[name]
        if method == "lora-null":
            return baselines.lora_null_factors(weight, c_pre, rank, scaling)
        return baselines.sc_lora_factors(weight, c_task, c_pre, rank, scaling, beta=beta)

    _apply_factors(peft_model, factors)


@torch.no_grad()
def _apply_factors(peft_model, factors: Callable) -> None:
    """Set every LoRA layer's (A, B) from ``factors(name, W, r, s)`` and move s·B·A out of the base weight."""
    for name, layer in lora_layers(peft_model).items():
        a_weight, b_weight, scaling = lora_a_weight(layer), lora_b_weight(layer), lora_scaling(layer)
        weight = base_weight_matrix(layer)
        a, b = factors(name, weight.float(), a_weight.shape[0], scaling)
        a_weight.copy_(a)
        b_weight.copy_(b)
        moved = (scaling * b.double() @ a.double()).to(weight.dtype)
        base = layer.get_base_layer().weight
        base.sub_(moved.T if getattr(layer, "fan_in_fan_out", False) else moved)


def save_initial_adapter(peft_model, method: str, directory: Path) -> None:
    """Save the adapter as initialised (before training), marked as a plain init so peft's weight conversion
    does not subtract it twice; needed by ``save_trained_adapter`` for ``MUTATING_INITS``."""
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(str(directory))
    finally:
        config.init_lora_weights = init


def save_trained_adapter(peft_model, method: str, directory: Path, initial_adapter: Path | None) -> None:
    """Write the trained adapter so it loads on the untouched base model: as is for methods that leave W alone,
    else as peft's rank-2r conversion against ``initial_adapter`` (``save_initial_adapter``'s folder)."""
    with replace_atomically(Path(directory)) as scratch:
        if method in MUTATING_INITS:
            if initial_adapter is None:
                raise ValueError(f"{method} changed the base weights: pass the initial adapter to convert against")
            peft_model.save_pretrained(str(scratch), path_initial_model_for_weight_conversion=str(initial_adapter))
        else:
            peft_model.save_pretrained(str(scratch))
