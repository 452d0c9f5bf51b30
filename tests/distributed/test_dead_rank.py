"""A rank that dies or hangs mid-refresh makes the others stop with an error within the collective timeout."""

from __future__ import annotations

import datetime
import importlib
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.spawn import free_port
from tests.distributed.test_equivalence import ADAMW, FOLORA, _batch, _micro_batch, _model, _proxy

TIMEOUT_SECONDS = 20


def _rank_main(rank: int, world: int, port: int, out_dir: str, failure: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    import folora_ds

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": ADAMW}, "folora": {**FOLORA, "refresh_interval": 2}}
    engine, controller = folora_ds.initialize(_model(), config, proxy_batches=[_proxy(rank)],
                                              task_batches=[_batch(rank)])
    if rank == 1:
        def fail() -> None:  # mid-refresh: the others are waiting in the statistics reduce
            if failure == "dies":
                os._exit(3)
            time.sleep(10 * TIMEOUT_SECONDS)
        controller._fold_task_window = fail
    outcome = "finished"
    started = time.perf_counter()
    try:
        for step in range(4):
            batch = _micro_batch(step, rank)
            with controller.track_task(batch):
                loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            started = time.perf_counter()
            controller.after_engine_step()
    except Exception as error:  # the point is to observe whatever the survivor raises
        outcome = f"{type(error).__name__}: {error}"
    Path(out_dir, f"rank{rank}.txt").write_text(f"{time.perf_counter() - started:.1f}\n{outcome}")
    os._exit(0)  # do not wait on a process group whose peer is gone


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_rank_failing_mid_refresh_stops_the_others_with_an_error(tmp_path, failure):
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, 2, port, str(tmp_path), failure))
                 for rank in range(2)]
    for process in processes:
        process.start()
    processes[0].join(timeout=TIMEOUT_SECONDS + 120)
    survivor_hung = processes[0].is_alive()
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    assert not survivor_hung, f"rank 0 hung after its peer {failure}"
    seconds, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome != "finished", "the survivor trained on without its peer"
    assert float(seconds) <= TIMEOUT_SECONDS + 10, f"the survivor needed {seconds} s to notice: {outcome}"
