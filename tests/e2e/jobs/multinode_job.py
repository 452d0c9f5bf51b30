"""One rank of a small FoLoRA job under torchrun, for tests/e2e/test_multinode.py: every rank trains 4 micro-batches
per optimizer step in total (accumulation 4 / world), saves a checkpoint, exports the adapter; rank 0 writes the
full weights and every rank's (RANK, LOCAL_RANK, GROUP_RANK) to OUT/result.pt.

    torchrun --nnodes 2 --node_rank N --nproc_per_node 2 ... tests/e2e/jobs/multinode_job.py STAGE OUT
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root: tests.testing.ranks

import torch  # noqa: E402

import folora_ds  # noqa: E402
from folora_ds.distributed import comm  # noqa: E402
from tests.testing.ranks import (
    STEPS,
    calibration_shards,
    ds_config,
    full_weights,
    tiny_model,
    train_steps,  # noqa: E402
)

MICRO_BATCHES = 4


def main(stage: int, out: Path) -> None:
    torch.set_num_threads(1)
    comm.init_distributed(timeout_seconds=120)
    rank, world = comm.rank(), comm.world_size()
    accumulation = MICRO_BATCHES // world
    engine, controller = folora_ds.initialize(tiny_model(), ds_config(stage, accumulation=accumulation),
                                              **calibration_shards(rank, world))
    train_steps(engine, controller, rank, world, 0, STEPS, accumulation)
    controller.check_gating()
    weights = full_weights(engine.module, stage)
    places = comm.all_gather_objects({"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
                                      "group_rank": int(os.environ.get("GROUP_RANK", "0"))})
    controller.save_checkpoint(out / "checkpoint", tag="final")
    controller.export_adapter(out / "adapter")
    if rank == 0:
        torch.save({"weights": weights, "places": places, "world": world,
                    "owners": dict(controller.owners)}, out / "result.pt")
    # Results are on disk. Skip interpreter teardown, as tests/testing/ranks.py does: a live ZeRO-3 engine and
    # gloo's threads torn down at exit aborted a rank (SIGABRT) once in ~20 runs after the work was done.
    comm.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
