"""One process, one tiny peft Llama: the model, batches and a calibrated controller the unit tests share."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from folora_ds.controller import FoLoRAController
from folora_ds.method.config import FoLoRAConfig
from folora_ds.training.models import build_tiny_llama
from tests.testing.ranks import TARGETS


def tiny_peft_llama(seed: int = 0):
    """A 2-block Llama (vocabulary 64, width 32) with rank-3 LoRA on every linear of ``TARGETS``."""
    torch.manual_seed(seed)
    base = build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                            seed=seed)
    return get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS))


def token_batches(count: int, seed: int, *, labels: bool = True):
    """Batches of 4 × 12 tokens, one row padded after 9; ``labels`` -100 on padding and a 3-token "prompt"."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 64, (4, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
            batch["labels"][:, :3] = -100
        batches.append(batch)
    return batches


def calibrated_controller(config: FoLoRAConfig, seed: int = 0):
    """``(model, controller)`` of ``tiny_peft_llama(seed)``, calibrated on 3 proxy and 3 task batches and solved."""
    model = tiny_peft_llama(seed)
    controller = FoLoRAController(model, config)
    controller.calibrate(token_batches(3, 1), token_batches(3, 2))
    controller.solve()
    return model, controller
