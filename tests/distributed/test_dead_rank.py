"""A rank that dies or hangs mid-refresh makes the others stop with an error within the collective timeout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.testing.ranks import (
    batch,
    ds_config,
    free_port,
    micro_batch,
    proxy_batch,
    setup_rank,
    tiny_model,
)

TIMEOUT_SECONDS = 20


def _rank_main(rank: int, world: int, port: int, out_dir: str, failure: str) -> None:
    setup_rank(rank, world, port, timeout_seconds=TIMEOUT_SECONDS)
    import folora_ds

    engine, controller = folora_ds.initialize(tiny_model(), ds_config(2, folora={"refresh_interval": 2}),
                                              proxy_batches=[proxy_batch(rank)], task_batches=[batch(rank)])
    if rank == 1:
        def fail(**_) -> None:  # mid-refresh: the others are waiting in the statistics reduce
            if failure == "dies":
                os._exit(3)
            time.sleep(10 * TIMEOUT_SECONDS)
        controller._fold_task_window = fail
    outcome = "finished"
    started = time.perf_counter()
    try:
        for step in range(4):
            data = micro_batch(step, rank)
            with controller.track_task(data):
                loss = engine(**data).loss
            engine.backward(loss)
            engine.step()
            started = time.perf_counter()
            controller.after_step()
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
    # the survivor names the rank that stopped answering and where it was (gloo alone says "Timed out ... recv")
    assert outcome.startswith("CollectiveTimeoutError: rank 1 (last phase 'refresh at optimizer step 2'"), outcome
    assert "did not reach the collective in 'refresh at optimizer step 2'" in outcome
    assert "raise --collective-timeout, or the timeout of the process group you start" in outcome, outcome
