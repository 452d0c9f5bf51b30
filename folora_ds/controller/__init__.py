"""The controller room: ``FoLoRAController`` (calibration, solves, delivery, refresh, metrics, state, export), the
proxy calibration set and FoLoRA's checkpoint parts. Frameworks' objects (a DeepSpeed engine, a peft model) arrive
as arguments; see README.md here for what this room may import.

``merge_state_parts`` (the state format's, ``folora_ds.method.state``) is re-exported here, where earlier versions
and their users found it: a resume on N ranks merges every rank's ``controller.state_dict()`` part with it."""

from folora_ds.controller.controller import FoLoRAController
from folora_ds.controller.reporting import LayerSummary
from folora_ds.method.state import merge_state_parts

__all__ = ["FoLoRAController", "LayerSummary", "merge_state_parts"]
