"""The trained adapter out: a standard peft adapter folder, written once for every rank."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from folora_ds.common.files import replace_atomically
from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any


def save_adapter(model: nn.Module, directory: Path) -> None:
    """Collective: rank 0 writes ``model``'s peft adapter to ``directory`` (ZeRO-3-partitioned adapter weights
    gathered for it; the frozen base is not); the folder appears complete or not at all."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    error = None
    with comm.gathered(trainable):
        if comm.rank() == 0:
            try:
                with replace_atomically(Path(directory)) as scratch:
                    model.save_pretrained(str(scratch))
            except OSError as problem:
                error = f"cannot write the adapter to {str(directory)!r}: {problem}"
    raise_if_any(error)  # also the barrier: every rank waits for the write
