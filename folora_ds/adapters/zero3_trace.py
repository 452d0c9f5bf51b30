"""ZeRO-3's parameter trace after forwards outside the training loop: forget it, so training records its own.

FoLoRA's calibration runs no-grad forwards through the engine's module after ``deepspeed.initialize`` (ZeRO-3
gathers each layer as it runs). ZeRO-3's ``PartitionedParameterCoordinator`` records the module order of the
passes it sees as its *trace*, and decides after each module which of its parameters to release by looking ahead
in that trace (a parameter the next modules use again stays gathered). That decision is cached per (module,
position in the trace) in an ``lru_cache`` that nothing clears: not ``reset_step``, not ``_invalidate_trace``
(DeepSpeed 0.19.8). The calibration's forwards leave a forward-only trace; training soon invalidates it and
records forward + backward, but the cached release decisions of the forward-only trace stay in use — so every
training step releases, at the end of the forward, parameters its backward needs at once, and gathers them again
(measured, 2 gloo ranks: a one-block model gathered 9 parameters per step instead of 5; the 4096 / 14336 block
took 2.66 s per plain-AdamW step instead of 1.80-2.02 s after two such forwards, and FoLoRA's engine always had
them: its "ZeRO-3 gap" in docs/benchmarks.md).

``forget_parameter_trace`` puts the coordinator back where a fresh engine starts: no trace, no cached decisions.
It reaches into DeepSpeed's internals (the only place in the package that does), so it checks what it finds and
says so when a DeepSpeed version lacks them; ``tests/distributed/test_zero3_trace.py`` counts the gathers per step
against a plain engine's, so a DeepSpeed upgrade that changes them fails there rather than slowing training.
"""

from __future__ import annotations

import logging
from typing import Any

_log = logging.getLogger(__name__)


def forget_parameter_trace(engine: Any) -> bool:
    """After forwards outside training on a ZeRO-3 ``engine``: drop its coordinator's trace and cached release
    decisions, so the next training step records its own. Returns whether there was a ZeRO-3 coordinator to
    reset (False for stages 0-2). A DeepSpeed without the expected internals is logged as a warning, not an
    error: training stays correct, only its ZeRO-3 steps may gather parameters again in the backward."""
    if engine.zero_optimization_stage() != 3:
        return False
    offload = getattr(engine.optimizer, "parameter_offload", None)
    coordinator = None if offload is None else offload.get_param_coordinator()
    cache = _release_cache(type(coordinator)) if coordinator is not None else None
    if coordinator is None or cache is None or not hasattr(coordinator, "_invalidate_trace"):
        import deepspeed

        _log.warning("DeepSpeed %s: ZeRO-3's parameter trace could not be reset after calibration (internals not "
                     "found); its training steps may gather parameters twice (docs/benchmarks.md)",
                     deepspeed.__version__)
        return False
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    cache.cache_clear()  # shared by every coordinator of the process (keyed by it): the others only recompute
    return True


def _release_cache(coordinator_class: type) -> Any:
    """The ``functools.lru_cache`` behind ``PartitionedParameterCoordinator.__params_to_release`` (under DeepSpeed's
    NVTX wrapper, which keeps it in its closure rather than as ``__wrapped__``), or None."""
    function = getattr(coordinator_class, f"_{coordinator_class.__name__}__params_to_release", None)
    for _ in range(4):  # through a few wrappers at most
        if function is None or hasattr(function, "cache_clear"):
            return function
        inner = getattr(function, "__wrapped__", None)
        if inner is None:
            cells = [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()
                     if callable(cell.cell_contents)]
            inner = next((cell for cell in cells if hasattr(cell, "cache_clear")), cells[0] if cells else None)
        function = inner
    return None
