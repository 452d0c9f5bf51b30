"""``distributed.phases`` in one process: phases cost nothing without a process group, and only a collective that
lost a peer is turned into ``CollectiveTimeoutError`` (tests/distributed/test_dead_rank.py runs the real case on
2 gloo ranks: a rank that hangs or dies mid-refresh is named with its phase)."""

from __future__ import annotations

import pytest
import torch

from folora_ds.distributed.phases import CollectiveTimeoutError, _is_lost_peer, phase


def test_without_a_process_group_a_phase_is_a_no_op_and_errors_pass_unchanged():
    with phase("calibration"):
        pass
    with pytest.raises(RuntimeError, match="^Timed out waiting 20000ms for recv$"), phase("refresh"):
        raise RuntimeError("Timed out waiting 20000ms for recv")  # one process: nobody else to name


@pytest.mark.parametrize(("error", "lost"), [
    (RuntimeError("[gloo] Timed out waiting 20000ms for recv operation to complete"), True),
    (RuntimeError("Connection closed by peer [127.0.0.1]:1234"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (CollectiveTimeoutError("rank 1 ... did not reach the collective"), False),
])
def test_only_a_lost_peer_is_surveyed(error, lost):
    assert _is_lost_peer(error) is lost or isinstance(error, CollectiveTimeoutError)
    if hasattr(torch.distributed, "DistBackendError"):
        assert _is_lost_peer(torch.distributed.DistBackendError("NCCL watchdog"))
