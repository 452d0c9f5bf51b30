"""Which rank stopped answering, and where: a collective that times out (or loses a peer) names the ranks that never
reached it and the last phase each of them entered.

A bare gloo timeout says "Timed out waiting 20000ms for recv" on the ranks that waited and nothing about the rank
that hung. Each rank records the phase it enters (calibration, a training step, a refresh) in the process group's
key-value store, one small write per phase. When a collective inside a phase fails, the ranks that were waiting
each mark themselves as waiting, give the others ``SURVEY_SECONDS`` to do the same, and name the ranks that did not::

    rank 0: refresh at optimizer step 2 ─ all-reduce ─ timeout ─┐ marks "waiting"   ┐
    rank 1: refresh at optimizer step 2 ─ (busy / hung) ───────────────────────────── no mark
    rank 0 raises: "rank 1 did not reach the collective (hung, or much slower) — last phase 'refresh at
                    optimizer step 2', entered 21 s ago; rank 0 waited in 'refresh at optimizer step 2' ..."

Without a running process group (one process) the phases cost nothing and nothing is recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from folora_ds.distributed import comm

SURVEY_SECONDS = 3.0
"""How long a rank whose collective failed waits for the other waiting ranks to mark themselves."""

_KEY = "folora/phase/{rank}"
_WAITING = "folora/waiting/{rank}/{phase}"


class CollectiveTimeoutError(RuntimeError):
    """A collective failed because some rank did not take part in time; the message names those ranks."""


def _store():
    """The process group's key-value store, or None (no group, or a backend without one)."""
    if not comm.is_running():
        return None
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that gave up on a peer (timed out, or its connection closed)."""
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    text = str(error).lower()
    return isinstance(error, backend_error) or any(word in text for word in (
        "timed out", "timeout", "connection closed", "connection reset", "broken pipe"))


@contextlib.contextmanager
def phase(name: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Record that this rank enters phase ``name``; a collective that fails inside it for a lost peer is re-raised
    as ``CollectiveTimeoutError`` naming the ranks that never reached it, their last phase, and the fix.

    Args:
        timeout_seconds: the process group's collective timeout, named in the message (default: the one
            ``comm.init_distributed`` started the group with, when it did).
    """
    store = _store()
    if store is None:
        yield
        return
    timeout_seconds = comm.collective_timeout() if timeout_seconds is None else timeout_seconds
    me, world = comm.rank(), comm.world_size()
    try:
        store.set(_KEY.format(rank=me), f"{time.time():.3f}|{name}")
    except RuntimeError:  # the store's host is gone: the collective below will say so
        pass
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, CollectiveTimeoutError) or not _is_lost_peer(error) or world == 1:
            raise
        raise CollectiveTimeoutError(_survey(store, me, world, name, error, timeout_seconds)) from error


def _survey(store, me: int, world: int, name: str, error: BaseException, timeout_seconds: float | None) -> str:
    """Mark this rank as waiting in ``name``, wait for the other waiting ranks, and describe the ones missing."""
    limit = f"the collective timeout is {timeout_seconds:g} s; " if timeout_seconds else ""
    waited = (f" ({limit}raise --collective-timeout, or the timeout of the process group you start, if a step or "
              "refresh legitimately takes longer)")
    try:
        store.set(_WAITING.format(rank=me, phase=name), "1")
        time.sleep(SURVEY_SECONDS)
        missing, described = [], []
        for rank in range(world):
            if rank == me or store.check([_WAITING.format(rank=rank, phase=name)]):
                continue
            missing.append(rank)
            last = store.get(_KEY.format(rank=rank)).decode() if store.check([_KEY.format(rank=rank)]) else None
            if last is None:
                described.append(f"rank {rank} (no phase recorded)")
            else:
                entered, last_phase = last.split("|", 1)
                described.append(f"rank {rank} (last phase {last_phase!r}, entered "
                                 f"{time.time() - float(entered):.0f} s ago)")
    except (RuntimeError, ValueError) as survey_error:  # the store itself is gone (its host died)
        return (f"a collective in {name!r} lost a peer and the rendezvous store is unreachable ({survey_error}); "
                f"rank {me} was waiting{waited}: {error}")
    if not missing:
        return f"a collective in {name!r} failed on every rank{waited}: {error}"
    return (f"{', '.join(described)} did not reach the collective in {name!r} (dead, hung or much slower); "
            f"rank {me} waited{waited}. Backend error: {str(error).splitlines()[0][:200]}")
