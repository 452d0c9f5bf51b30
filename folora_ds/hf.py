"""The public import path of FoLoRA's Hugging Face ``Trainer`` / TRL integration (``folora_ds.adapters.hf``).

    from folora_ds.hf import FoLoRATrainer, folora_trainer_class
"""

from folora_ds.adapters.hf import FoLoRATrainer, FoLoRATrainerMixin, folora_trainer_class

__all__ = ["FoLoRATrainer", "FoLoRATrainerMixin", "folora_trainer_class"]
