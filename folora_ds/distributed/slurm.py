"""torch.distributed's rendezvous variables from SLURM's, for processes started by ``srun`` directly.

DeepSpeed and torch read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; SLURM sets none of them. When
``srun`` starts one task per rank (``--ntasks-per-node`` = ranks per node), each task knows its place from
SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID and the step's node list. Only srun sets SLURM_STEP_NUM_TASKS:
the batch script itself (and a plain ``python`` run from it) also has SLURM_PROCID=0 and SLURM_NTASKS=N, and must
stay a plain process rather than wait for N − 1 ranks that never come (checked on a real SLURM 22.05).
``rendezvous_from_slurm`` derives the torch variables (pure: an environment mapping in, the variables to set out),
so ``comm.init_distributed`` can start the group under a plain ``srun python launch/train.py ...``. Launchers that
set RANK themselves (torchrun per node, the deepspeed launcher, mpirun) are left alone.

MASTER_ADDR is the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST; SLURM's compressed form, e.g.
``gpu[003-005,010],login1``, expanded here without calling ``scontrol``); MASTER_PORT is taken from the environment
when set, else derived from the job id (29500 + job id mod 10000), so every task of the job picks the same port and
two jobs sharing a first node rarely collide.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PORT_BASE = 29500
PORT_SPAN = 10000


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names in order: ``"a[01-03,07],b"`` → a01 a02 a03 a07 b.

    Zero padding of a range is kept (``n[08-10]`` → n08 n09 n10).

    Raises:
        ValueError: an empty list, unbalanced brackets or a malformed range.
    """
    depth = 0
    for character in nodelist:
        depth += {"[": 1, "]": -1}.get(character, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    if depth != 0:
        raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()):
        if "[" not in item:
            hosts.append(item)
            continue
        prefix, rest = item.split("[", 1)
        if "]" not in rest:
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets in {item!r}")
        ranges, suffix = rest.split("]", 1)
        if "[" in suffix:
            raise ValueError(f"SLURM node list {nodelist!r}: more than one bracket group in {item!r} is not supported")
        for part in ranges.split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if match is None:
                raise ValueError(f"SLURM node list {nodelist!r}: malformed range {part!r}")
            low, high = match.group(1), match.group(2) or match.group(1)
            if int(high) < int(low):
                raise ValueError(f"SLURM node list {nodelist!r}: descending range {part!r}")
            hosts += [f"{prefix}{number:0{len(low)}d}{suffix}" for number in range(int(low), int(high) + 1)]
    if not hosts or "" in hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def rendezvous_from_slurm(environment: Mapping[str, str]) -> dict[str, str]:
    """The torch variables to set for an ``srun``-started rank; empty when they are not needed.

    Nothing is derived when RANK is already set (another launcher did it), outside an srun step (no
    SLURM_STEP_NUM_TASKS: e.g. the batch script itself), or when the step has one task (a plain process).

    Raises:
        ValueError: SLURM variables that contradict each other (named).
    """
    if "RANK" in environment or "SLURM_PROCID" not in environment or "SLURM_STEP_NUM_TASKS" not in environment:
        return {}  # not an srun task: the batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS=N
    tasks = int(environment["SLURM_STEP_NUM_TASKS"])  # the step's tasks (srun -n may use fewer than the job's)
    if tasks <= 1:
        return {}
    rank = int(environment["SLURM_PROCID"])
    if not 0 <= rank < tasks:
        raise ValueError(f"SLURM_PROCID={rank} is outside SLURM_STEP_NUM_TASKS={tasks}")
    nodelist = environment.get("SLURM_STEP_NODELIST") or environment.get("SLURM_JOB_NODELIST") or \
        environment.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("srun started this rank but SLURM_JOB_NODELIST is not set: cannot find the master host")
    if "SLURM_LOCALID" not in environment:
        raise ValueError("srun started this rank but SLURM_LOCALID is not set: cannot find its local rank")
    port = environment.get("MASTER_PORT") or str(PORT_BASE + int(environment.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return {"RANK": str(rank), "WORLD_SIZE": str(tasks), "LOCAL_RANK": environment["SLURM_LOCALID"],
            "MASTER_ADDR": environment.get("MASTER_ADDR") or expand_nodelist(nodelist)[0], "MASTER_PORT": port}
