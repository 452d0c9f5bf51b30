"""SLURM's variables → torch's rendezvous variables (simulated environments; the real srun run is
scripts/slurm_local.sh, recorded in docs/launching.md)."""

import pytest

from folora_ds.distributed.slurm import expand_nodelist, rendezvous_from_slurm


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[003-005,010],login1", ["gpu003", "gpu004", "gpu005", "gpu010", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]-a", ["rack1-a", "rack2-a"]),
    ("a,b[1,3]", ["a", "b1", "b3"]),
])
def test_nodelists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[1-3", "gpu[3-1]", "gpu[a-b]", "x[1-2]y[3]"])
def test_malformed_nodelists_are_named(nodelist):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(nodelist)


SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-006]", "SLURM_JOB_ID": "123456"}


def test_an_srun_rank_gets_torch_variables():
    # srun -n 4 inside a job of 8 tasks: the step's count is the world
    assert rendezvous_from_slurm({**SRUN, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"})["WORLD_SIZE"] == "4"
    assert rendezvous_from_slurm(SRUN) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                           "MASTER_ADDR": "gpu003", "MASTER_PORT": str(29500 + 123456 % 10000)}
    # a port or master the user exported wins; the step's node list is preferred to the job's
    mapped = rendezvous_from_slurm({**SRUN, "MASTER_PORT": "6000", "SLURM_STEP_NODELIST": "gpu[005-006]"})
    assert mapped["MASTER_PORT"] == "6000" and mapped["MASTER_ADDR"] == "gpu005"


@pytest.mark.parametrize("environment", [
    {**SRUN, "RANK": "0"},                                  # torchrun / deepspeed already set the rendezvous
    {k: v for k, v in SRUN.items() if k != "SLURM_PROCID"},
    # the batch script itself (as measured on SLURM 22.05): SLURM_PROCID=0 and SLURM_NTASKS=N, but no step
    {**{k: v for k, v in SRUN.items() if k != "SLURM_STEP_NUM_TASKS"}, "SLURM_PROCID": "0"},
    {**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},     # srun -n 1: a plain process
    {},
])
def test_nothing_is_set_when_not_an_srun_rank_of_several(environment):
    assert rendezvous_from_slurm(environment) == {}


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": "8"}, "outside SLURM_STEP_NUM_TASKS=8"),
    ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not set"),
])
def test_contradicting_slurm_variables_are_named(change, match):
    environment = {**SRUN, **{k: v for k, v in change.items() if v is not None}}
    for key in [k for k, v in change.items() if v is None]:
        environment.pop(key)
    with pytest.raises(ValueError, match=match):
        rendezvous_from_slurm(environment)
