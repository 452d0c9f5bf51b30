"""Two "nodes" × two ranks on one machine (torchrun --nnodes 2 --node_rank 0/1 on localhost): LOCAL_RANK ≠ RANK,
and the result equals one node with two ranks on the same 4 micro-batches per step (weights within 1e-6), the
checkpoint has one FoLoRA part per global rank, and rank-0-only output is written once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.testing.ranks import free_port

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests" / "e2e" / "jobs" / "multinode_job.py"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def _torchrun(nodes: int, per_node: int, stage: int, out: Path) -> None:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([TORCHRUN, "--nnodes", str(nodes), "--node_rank", str(node), "--nproc_per_node",
                                   str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(JOB),
                                   str(stage), str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for node in range(nodes)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, (stdout[-2000:], stderr[-6000:])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_nodes_of_two_ranks_equal_one_node_of_two(stage, tmp_path):
    _torchrun(2, 2, stage, tmp_path / "nodes")
    _torchrun(1, 2, stage, tmp_path / "single")
    nodes = torch.load(tmp_path / "nodes" / "result.pt", weights_only=False)
    single = torch.load(tmp_path / "single" / "result.pt", weights_only=False)
    assert nodes["world"] == 4 and single["world"] == 2
    assert [(p["rank"], p["local_rank"], p["group_rank"]) for p in nodes["places"]] == [
        (0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert set(nodes["owners"].values()) == {0, 1, 2, 3}, "every rank of both nodes owns inputs"
    for name, expected in single["weights"].items():
        torch.testing.assert_close(nodes["weights"][name], expected, rtol=0, atol=1e-6, msg=name)
    parts = sorted(p.name for p in (tmp_path / "nodes" / "checkpoint" / "final" / "folora_state").iterdir())
    assert parts == [f"rank_{r:05d}_of_00004.pt" for r in range(4)]
    assert (tmp_path / "nodes" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "nodes").glob(".*partial*")), "no half-written output"
