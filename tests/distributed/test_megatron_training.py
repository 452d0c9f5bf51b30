"""FoLoRA trained under Megatron tensor parallelism equals one process at TP = 1 (``tests/testing/megatron.py``):
TP = 2 x DP = 1 on 2 gloo ranks and TP = 2 x DP = 2 on 4, with gradient accumulation, clipping, a refresh during
training and a k that truncates. Statistics (raw token counts included: column inputs counted once per replica),
gates, forgetting and LoRA weights agree; whole-A copies stay bit-identical across TP ranks; the row-parallel gate
costs one r x k all-reduce per LoRA-A and step."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")

from tests.testing.megatron import (  # noqa: E402
    FOLORA,
    LORA_RANK,
    STEPS,
    TinyLM,
    batch,
    resume_error,
    train,
    train_with_engine,
)
from tests.testing.ranks import run_ranks  # noqa: E402

ROW_LAYERS = ("o_proj", "down_proj")


def _train(rank: int, world: int, tp_size: int) -> dict:
    return train(tp_size)


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_ranks(1, _train, 1)[0]


def _union(results: list[dict], field: str) -> dict:
    """A per-owner field (statistics, gates) joined over the ranks; each key appears on exactly one."""
    joined = {}
    for result in results:
        assert not set(joined) & set(result[field]), f"{field}: a key held by two ranks"
        joined.update(result[field])
    return joined


def _assert_statistics_and_copies(results: list[dict], reference: dict) -> None:
    """C_pre and the gates (each on its owner) equal one process's; whole copies of A (column layers) are
    bit-identical across the TP ranks of each replica."""
    pre, gates = _union(results, "pre"), _union(results, "gates")
    assert set(pre) == set(reference["pre"]) == set(gates)
    for key, expected in reference["pre"].items():
        torch.testing.assert_close(pre[key], expected, rtol=0, atol=1e-6, msg=lambda m, k=key: f"C_pre {k}: {m}")
        torch.testing.assert_close(gates[key], reference["gates"][key], rtol=0, atol=1e-6,
                                   msg=lambda m, k=key: f"gates {k}: {m}")
    for first, second in zip(results[::2], results[1::2]):
        assert (first["replica"], first["tp_rank"], second["tp_rank"]) == (second["replica"], 0, 1)
        for name, tensor in first["local_a"].items():
            if name.rsplit(".", 1)[-1] not in ROW_LAYERS:
                assert torch.equal(tensor, second["local_a"][name]), f"{name}: the TP copies of A differ"


@pytest.mark.parametrize("world", [2, 4], ids=["tp2-dp1", "tp2-dp2"])
def test_tensor_parallel_training_equals_one_process(world, reference):
    results = run_ranks(world, _train, 2)
    assert reference["layout"] == 1 and all(result["layout"] == 2 for result in results)
    assert reference["refreshes"] == STEPS // FOLORA["refresh_interval"] == 1
    for rank, result in enumerate(results):
        assert result["steps"] == STEPS and result["refreshes"] == reference["refreshes"], f"rank {rank}"
        assert set(result["gated"]) == {STEPS}, f"rank {rank}: gated steps {result['gated']}"
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
        assert result["forgetting"] == pytest.approx(reference["forgetting"], rel=1e-6)
        # one r x k all-reduce per row-parallel LoRA-A per step, nothing else over TP in the gate
        assert result["reduces"] == [(LORA_RANK, FOLORA["k"])] * (len(ROW_LAYERS) * STEPS), f"rank {rank}"
    pre, gates, window = (_union(results, field) for field in ("pre", "gates", "window"))
    assert set(pre) == set(reference["pre"]) == set(gates) and set(window) == set(reference["window"])
    for key, expected in reference["pre"].items():
        torch.testing.assert_close(pre[key], expected, rtol=0, atol=1e-6, msg=lambda m, k=key: f"C_pre {k}: {m}")
        torch.testing.assert_close(gates[key], reference["gates"][key], rtol=0, atol=1e-6)
    for key, (tokens, sums) in reference["window"].items():
        # raw sums, not covariances: counting a column input on both TP ranks would double tokens and sum alike
        assert window[key][0] == tokens, f"{key}: {window[key][0]} tokens counted, one process counted {tokens}"
        torch.testing.assert_close(window[key][1] / tokens, sums / tokens, rtol=0, atol=1e-6)
    _assert_statistics_and_copies(results, reference)


def _train_with_engine(rank: int, world: int, tp_size: int, stage: int) -> dict:
    return train_with_engine(tp_size, stage)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [2, 4], ids=["tp2-dp1", "tp2-dp2"])
def test_deepspeed_with_the_megatron_mpu_equals_one_process(world, stage, reference):
    """folora_ds.initialize(..., mpu=MegatronMpu()) at ZeRO 0-3: DeepSpeed accumulates, reduces and partitions
    over DP only and clips with the TP-aware norm; a row-parallel A's rows cut by a ZeRO partition get their
    coordinates summed over DP, then every row of it over TP. The result is the one-process TP = 1 run's."""
    results = run_ranks(world, _train_with_engine, 2, stage)
    _assert_statistics_and_copies(results, reference)
    for rank, result in enumerate(results):
        assert result["dp"] == (world // 2, world // 2), f"rank {rank}: DeepSpeed's data-parallel size"
        assert result["steps"] == STEPS and result["refreshes"] == reference["refreshes"]
        assert set(result["gated"]) == {STEPS}, f"rank {rank}: gated steps {result['gated']}"
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


def _first_half(rank: int, world: int, folder: str) -> dict:
    return train_with_engine(2, 2, first=0, last=STEPS // 2, save_to=folder)


def _second_half(rank: int, world: int, folder: str, adapter: str) -> dict:
    return train_with_engine(2, 2, first=STEPS // 2, last=STEPS, resume_from=folder, export_to=adapter)


def _resume_at_tp1(rank: int, world: int, folder: str) -> str:
    return resume_error(1, folder)


def test_checkpoint_resume_at_the_same_tp_and_the_exported_adapter_equal_one_process(tmp_path, reference):
    """TP = 2 x DP = 2 at ZeRO 2: 3 steps, checkpoint, 3 more steps in new processes from it (the refresh falls in
    the second half) equal the uninterrupted one-process run; the exported adapter (TP shards joined) loads with
    plain PeftModel.from_pretrained on the unsharded twin and computes the TP = 1 run's logits. Resuming at
    TP = 1 is refused before any engine starts."""
    folder, adapter = str(tmp_path / "checkpoint"), str(tmp_path / "adapter")
    run_ranks(4, _first_half, folder)
    for rank, result in enumerate(run_ranks(4, _second_half, folder, adapter)):
        assert result["steps"] == STEPS and result["refreshes"] == reference["refreshes"], f"rank {rank}"
        assert set(result["gated"]) == {STEPS}, f"rank {rank}: gated steps {result['gated']}"
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
    twin = TinyLM()
    twin.load_state_dict(reference["twin"])
    adapted = PeftModel.from_pretrained(twin, adapter).eval()
    with torch.no_grad():
        logits = adapted(**batch(99)).logits
    torch.testing.assert_close(logits, reference["probe_logits"], rtol=0, atol=1e-5)
    base = TinyLM()
    base.load_state_dict(reference["twin"])
    with torch.no_grad():  # the adapter matters: without it the logits are far from these
        assert float((base(**batch(99)).logits - logits).abs().max()) > 1e-2
    for message in run_ranks(2, _resume_at_tp1, folder):
        assert "written at tensor-parallel size 2, this run has 1" in message
