"""FoLoRAController: calibrate → solve → init → deliver → refresh, on a tiny peft Llama."""

from __future__ import annotations

import pytest
import torch

from folora_ds.controller import FoLoRAController
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups
from folora_ds.method.peft_layers import lora_a_weight, lora_b_weight, lora_layers, lora_scaling
from folora_ds.method.projector import eigenvector_rows
from folora_ds.training.models import build_tiny_llama
from tests.testing.controller import calibrated_controller, tiny_peft_llama, token_batches


def test_solve_produces_one_projector_per_shared_input():
    model, controller = calibrated_controller(FoLoRAConfig(k=5))
    assert len(controller.owned_projectors) == 8  # 4 inputs per block (attn-in, o-in, mlp-in, down-in) × 2 blocks
    for projector in controller.owned_projectors.values():
        assert projector.rank == 5


def _initialize_keeping_output(model, controller) -> dict[str, torch.Tensor]:
    """Run `initialize_lora_a`, assert the model output did not move (B = 0), and return A from before."""
    before = {name: lora_a_weight(layer).detach().clone() for name, layer in controller.layers.items()}
    ids = token_batches(1, 9)[0]
    with torch.no_grad():
        logits_before = model(**ids).logits
    controller.initialize_lora_a()
    with torch.no_grad():
        assert torch.equal(logits_before, model(**ids).logits)  # B = 0: the adapter contributes nothing yet
    return before


def test_projected_init_keeps_row_norms_and_model_output():
    model, controller = calibrated_controller(FoLoRAConfig())
    before = _initialize_keeping_output(model, controller)
    changed = 0
    for name, layer in controller.layers.items():
        after = lora_a_weight(layer).detach()
        torch.testing.assert_close(after.norm(dim=1), before[name].norm(dim=1), rtol=1e-5, atol=1e-6)
        changed += int(not torch.allclose(after, before[name]))
    assert changed == len(controller.layers)


def test_eigenvector_init_writes_the_top_lambda_directions_and_keeps_the_output():
    model, controller = calibrated_controller(FoLoRAConfig(init="eigenvectors"))
    before = _initialize_keeping_output(model, controller)
    for name, layer in controller.layers.items():
        projector = controller.owned_projectors[controller.collector.key_of(name)]
        expected = eigenvector_rows(before[name].double(), projector).float()
        torch.testing.assert_close(lora_a_weight(layer).detach(), expected, rtol=1e-5, atol=1e-6)
        first_row = lora_a_weight(layer)[0].detach().double()  # the largest λ: the exact projector's last column
        cosine = torch.nn.functional.cosine_similarity(first_row, projector.v[:, -1], 0)
        assert abs(float(cosine)) > 1 - 1e-5, name


def test_kaiming_init_leaves_lora_a_untouched():
    model, controller = calibrated_controller(FoLoRAConfig(init="kaiming"))
    before = [lora_a_weight(layer).detach().clone() for layer in controller.layers.values()]
    controller.initialize_lora_a()
    for weight, layer in zip(before, controller.layers.values()):
        assert torch.equal(weight, lora_a_weight(layer))


def _train(model, controller, optimizer, steps: int, batches: list | None = None):
    for batch in token_batches(steps, 5, labels=True) if batches is None else batches:
        with controller.track_task(batch):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.after_step()


def test_training_gates_every_step_and_refreshes_on_schedule():
    model, controller = calibrated_controller(FoLoRAConfig(refresh_interval=3))
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    first = {key: projector.v.clone() for key, projector in controller.projectors.items()}
    _train(model, controller, optimizer, 7)
    assert controller.refreshes == 2
    assert set(optimizer.gated_step_counts().values()) == {7}
    assert len(optimizer.gated_step_counts()) == len(controller.layers)
    # the running C_task changed the bases, and the optimizer got the new ones
    assert any(not torch.allclose(first[key], controller.projectors[key].v) for key in first)
    for name, layer in controller.layers.items():
        delivered = optimizer.projector(lora_a_weight(layer))
        torch.testing.assert_close(delivered.v, controller.projectors[controller.collector.key_of(name)].v)


@pytest.mark.parametrize("total, refreshes, collected", [(7, 2, 6), (6, 1, 3), (None, 2, 7), (2, 0, 0)])
def test_a_run_of_known_length_skips_what_no_later_step_reads(total, refreshes, collected):
    """refresh_interval 3: with 7 steps the refreshes at 3 and 6 gate later steps and step 7's window (ending with
    the run) is not collected; with 6 the refresh at 6 and its window are skipped; unknown length collects all."""
    model, controller = calibrated_controller(FoLoRAConfig(refresh_interval=3, statistics_tokens=None))
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    controller.set_total_steps(total)
    counted = []
    window = controller.collector.sums

    def after(batch_step: int) -> None:
        counted.append(sum(int(sums.tokens) for sums in window("task").values()) > 0)

    for step, batch in enumerate(token_batches(7 if total is None else total, 5, labels=True), start=1):
        with controller.track_task(batch):
            loss = model(**batch).loss
        after(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.after_step()
    assert controller.refreshes == refreshes
    assert sum(counted) == collected  # micro-batches whose window held task tokens when they ran
    assert set(optimizer.gated_step_counts().values()) == {7 if total is None else total}
    with pytest.raises(ValueError, match="total_steps=0 must be None or an integer >= 1"):
        controller.set_total_steps(0)


def test_refresh_without_tracked_forwards_names_the_problem():
    model, controller = calibrated_controller(FoLoRAConfig(refresh_interval=1))
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    batch = token_batches(1, 5, labels=True)[0]
    model(**batch).loss.backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="track_task"):
        controller.after_step()


def test_forgetting_penalty_matches_explicit_trace():
    model, controller = calibrated_controller(FoLoRAConfig())
    with torch.no_grad():
        for layer in controller.layers.values():
            lora_b_weight(layer).normal_()
    penalties = controller.forgetting_penalty()
    for name, layer in controller.layers.items():
        delta = lora_scaling(layer) * lora_b_weight(layer).detach().double() @ lora_a_weight(layer).detach().double()
        c_pre = controller.pre_covariances[controller.collector.key_of(name)].double()
        assert penalties[name] == pytest.approx(float(torch.trace(delta @ c_pre @ delta.T)), rel=1e-9)


def test_empty_calibration_sets_are_refused():
    model = tiny_peft_llama()
    controller = FoLoRAController(model, FoLoRAConfig())
    with pytest.raises(ValueError, match="proxy calibration set"):
        controller.calibrate([], token_batches(1, 2))
    with pytest.raises(ValueError, match="task calibration set"):
        controller.calibrate(token_batches(1, 1), [])


def test_all_padding_task_data_is_refused_naming_an_input():
    model = tiny_peft_llama()
    controller = FoLoRAController(model, FoLoRAConfig())
    padded = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long),
               "labels": torch.full((2, 5), -100)}]
    with pytest.raises(ValueError, match="zero unmasked tokens"):
        controller.calibrate(token_batches(1, 1), padded)


def test_label_mask_restricts_task_statistics():
    model = tiny_peft_llama()
    controller = FoLoRAController(model, FoLoRAConfig(task_token_mask="labels"))
    batch = token_batches(1, 3, labels=True)[0]
    batch["labels"][:, :6] = -100
    key = next(iter(lora_layers(model)))
    captured = []
    handle = lora_layers(model)[key].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    controller.calibrate(token_batches(1, 1), [batch])
    handle.remove()
    inputs = captured[-1].detach()  # the task pass runs after the proxy pass
    mask = (batch["labels"] != -100) & (batch["attention_mask"] == 1)
    rows = inputs[mask]
    assert rows.shape[0] == 4 * 6 - 3
    torch.testing.assert_close(controller.task_ema[key], rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    assert controller.task_ema.rows(key) == rows.shape[0], "the rows folded in bound C_task's rank for the solver"


def test_each_solve_is_told_the_rows_folded_into_its_c_task(monkeypatch):
    """The top-k solver counts C_task's null space from them (``SpectralSolver.solve(task_rows=)``): calibration's
    task rows first, a training window's rows added at the refresh."""
    model, controller = calibrated_controller(FoLoRAConfig(task_token_mask="attention", statistics_tokens=None,
                                                           refresh_interval=1))
    calibration_rows = {key: controller.task_ema.rows(key) for key in controller.pre_covariances}
    assert all(isinstance(rows, int) and rows > 0 for rows in calibration_rows.values())
    told = {}
    solve = controller.solver.solve

    def spying(key, *args, task_rows=None, **kwargs):
        told[key] = task_rows
        return solve(key, *args, task_rows=task_rows, **kwargs)

    monkeypatch.setattr(controller.solver, "solve", spying)
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    batch = token_batches(1, 5)[0]
    with controller.track_task(batch):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    controller.after_step()  # the refresh at step 1: the window folds in, every input is solved again
    real_tokens = int(batch["attention_mask"].sum())
    assert told == {key: rows + real_tokens for key, rows in calibration_rows.items()}


def test_the_default_label_mask_refuses_task_batches_without_labels_and_attention_counts_them():
    unlabelled = token_batches(1, 3, labels=False)
    with pytest.raises(ValueError, match="task calibration batch has no 'labels'.*task_token_mask='attention'"):
        FoLoRAController(tiny_peft_llama(), FoLoRAConfig()).calibrate(token_batches(1, 1), unlabelled)
    model = tiny_peft_llama()
    controller = FoLoRAController(model, FoLoRAConfig(task_token_mask="attention"))
    key = next(iter(lora_layers(model)))
    captured = []
    handle = lora_layers(model)[key].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    controller.calibrate(token_batches(1, 1), unlabelled)  # every real token counted, no labels needed
    handle.remove()
    rows = captured[-1].detach()[unlabelled[0]["attention_mask"] == 1]
    assert rows.shape[0] == 4 * 12 - 3
    torch.testing.assert_close(controller.task_ema[key], rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)


def test_a_training_batch_without_labels_is_refused_under_the_label_mask_even_when_not_sampled():
    model, controller = calibrated_controller(FoLoRAConfig(statistics_every=2))
    with controller.track_task(token_batches(1, 4)[0]):
        pass
    with pytest.raises(ValueError, match="training batch has no 'labels'"):
        with controller.track_task(token_batches(1, 4, labels=False)[0]):  # the 2nd forward: not sampled, still checked
            pass


def test_labels_that_are_not_one_per_token_are_refused_naming_the_attention_mask():
    batch = token_batches(1, 3)[0]
    batch["labels"] = torch.zeros(4, dtype=torch.long)  # sequence classification: one label per sequence
    with pytest.raises(ValueError, match=r"one label per input token.*\(4,\).*\(4, 12\).*'attention'"):
        FoLoRAController(tiny_peft_llama(), FoLoRAConfig()).calibrate(token_batches(1, 1), [batch])


def test_solve_before_calibrate_is_an_error():
    controller = FoLoRAController(tiny_peft_llama(), FoLoRAConfig())
    with pytest.raises(RuntimeError, match="calibrate"):
        controller.solve()


def test_every_lora_module_is_mapped_to_an_input_key():
    model, controller = calibrated_controller(FoLoRAConfig())
    assert set(lora_layers(model)) == {name for members in controller.collector.members().values()
                                       for name in members}


def _penalty_after_training(config: FoLoRAConfig) -> tuple[float, FoLoRAController]:
    model, controller = calibrated_controller(config)
    controller.initialize_lora_a()
    optimizer = GatedAdamW(folora_param_groups(model), lr=3e-2)
    controller.attach(optimizer)
    _train(model, controller, optimizer, 12)
    return sum(controller.forgetting_penalty().values()), controller


def test_forgetting_budget_raises_tau_when_over_budget_and_forgets_less():
    free, _ = _penalty_after_training(FoLoRAConfig(refresh_interval=2, tau=0.5))
    budgeted, controller = _penalty_after_training(FoLoRAConfig(refresh_interval=2, tau=0.5,
                                                                forgetting_budget=1e-6, budget_step_size=1.0))
    assert controller.budget.last_measured > 1e-6  # the run was over budget at its refreshes ...
    assert controller.budget.tau_scale > 10  # ... so τ grew ...
    taus = [summary.tau for summary in controller.layer_summaries()]
    assert all(tau > 0 for tau in taus)
    assert budgeted < 0.8 * free, (budgeted, free)  # ... and the adapter forgot less than without a budget
    energies = controller.base_energies()
    expected = sum(p / energies[name] for name, p in controller.forgetting_penalty().items()) / len(energies)
    assert controller.measured_forgetting() == pytest.approx(expected, rel=1e-12)


def _uninterrupted_and_resumed(config: FoLoRAConfig, batches: list, stop: int):
    """Train on ``batches`` straight through, and again with a state-dict save/restore (fresh model, controller
    and optimizer) after ``stop`` steps; returns both final weights and the restored controller."""
    model, controller = calibrated_controller(config)
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    _train(model, controller, optimizer, len(batches), batches)
    expected = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    model, controller = calibrated_controller(config)
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    _train(model, controller, optimizer, stop, batches[:stop])
    state, optimizer_state = controller.state_dict(), optimizer.state_dict()
    resumed = tiny_peft_llama()
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            param.copy_(dict(model.named_parameters())[name])
    restored = FoLoRAController(resumed, config)
    restored.load_state_dict(state)
    restored_optimizer = GatedAdamW(folora_param_groups(resumed), lr=1e-2)
    restored_optimizer.load_state_dict(optimizer_state)
    restored.attach(restored_optimizer)
    counters = (restored.optimizer_steps, restored.refreshes)
    _train(resumed, restored, restored_optimizer, len(batches) - stop, batches[stop:])
    restored.check_gating()
    weights = {name: p.detach().clone() for name, p in resumed.named_parameters() if p.requires_grad}
    return expected, weights, counters


def test_a_state_dict_restores_training_exactly_in_one_process():
    """Train 4 steps, save, restore into a fresh controller/optimizer, train 3 more: equal to 7 uninterrupted."""
    expected, resumed, counters = _uninterrupted_and_resumed(FoLoRAConfig(refresh_interval=2, k=6),
                                                             token_batches(7, 5, labels=True), 4)
    assert counters == (4, 2)
    for name, value in resumed.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_a_state_dict_of_another_lora_rank_is_refused():
    model, controller = calibrated_controller(FoLoRAConfig())
    other = FoLoRAController(tiny_peft_llama(), FoLoRAConfig(lora_rank=4))
    with pytest.raises(ValueError, match="different FoLoRA config: \\['lora_rank'\\]"):
        other.load_state_dict(controller.state_dict())


def _split_into_parts(state: dict, world: int) -> list[dict]:
    """``state`` cut as ``world`` ranks would save it: input i's entries in part i % world."""
    keys = list(state["dims"])
    return [{**state, "part": (rank, world),
             **{name: {key: value for key, value in state[name].items() if keys.index(key) % world == rank}
                for name in ("pre", "ema", "ema_rows", "task_window", "solver")}} for rank in range(world)]


def test_state_parts_of_every_rank_merge_into_the_whole_state():
    from folora_ds.method.state import merge_state_parts

    _, controller = calibrated_controller(FoLoRAConfig())
    state = controller.state_dict()
    parts = _split_into_parts(state, 3)
    merged = merge_state_parts(reversed(parts))
    for name in ("pre", "ema", "ema_rows", "solver"):
        assert set(merged[name]) == set(state[name])
    for key, value in state["pre"].items():
        assert merged["pre"][key] is value or torch.equal(merged["pre"][key], value)
    with pytest.raises(ValueError, match=r"missing: \[1\]"):
        merge_state_parts([parts[0], parts[2]])
    with pytest.raises(ValueError, match="rank 2 belongs to another run or step"):
        merge_state_parts([parts[0], parts[1], {**parts[2], "optimizer_steps": 7}])
    fresh = FoLoRAController(tiny_peft_llama(), FoLoRAConfig())
    with pytest.raises(ValueError, match="lacks input .* every rank's part"):
        fresh.load_state_dict(parts[0])


def test_check_gating_catches_a_step_that_went_ungated():
    model, controller = calibrated_controller(FoLoRAConfig(refresh_interval=0))
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    _train(model, controller, optimizer, 2)
    controller.check_gating()
    controller.after_step()  # an optimizer step counted without the gate running
    with pytest.raises(RuntimeError, match="did not run on every step"):
        controller.check_gating()


def test_after_step_before_attach_and_save_without_engine_are_named():
    model, controller = calibrated_controller(FoLoRAConfig())
    with pytest.raises(RuntimeError, match="before attach"):
        controller.after_step()
    with pytest.raises(RuntimeError, match="needs a DeepSpeed engine"):
        controller.save_checkpoint("unused")


def test_summaries_penalties_and_export_work_in_one_process(tmp_path):
    from peft import PeftModel

    model, controller = calibrated_controller(FoLoRAConfig())
    summaries = controller.layer_summaries()
    assert [summary.key for summary in summaries] == controller.collector.keys()
    assert all(0 < summary.effective_rank <= summary.dim for summary in summaries)
    other = tiny_peft_llama(seed=0)
    with torch.no_grad():
        for layer in lora_layers(other).values():
            lora_b_weight(layer).normal_()
    assert all(value == 0 for value in controller.forgetting_penalty().values())  # B = 0: no adapter yet
    assert all(value > 0 for value in controller.forgetting_penalty(other).values())  # another model's adapter
    controller.export_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2,
                                                        num_heads=4, num_kv_heads=2, seed=0), str(tmp_path / "adapter"))
    for name, layer in lora_layers(loaded).items():
        torch.testing.assert_close(lora_a_weight(layer), lora_a_weight(controller.layers[name]))


def test_statistics_every_n_micro_batches_and_sampled_tokens_feed_the_running_c_task():
    """statistics_every = 2: only micro-batches 1, 3, 5 reach C_task; statistics_tokens = 7 of their 4 × 12 − 3."""
    model, controller = calibrated_controller(FoLoRAConfig(refresh_interval=0, statistics_every=2, statistics_tokens=7))
    optimizer = GatedAdamW(folora_param_groups(model), lr=1e-2)
    controller.attach(optimizer)
    _train(model, controller, optimizer, 5)
    assert controller.task_forwards == 5
    window = controller.collector.sums("task")
    assert {int(sums.tokens) for sums in window.values()} == {3 * 7}


def test_sampled_statistics_resume_with_the_same_draws():
    """The draw is seeded by the micro-batch count, which the state dict carries."""
    expected, resumed, _ = _uninterrupted_and_resumed(FoLoRAConfig(refresh_interval=2, statistics_tokens=5, k=6),
                                                      token_batches(6, 5, labels=True), 3)  # the step-4 refresh matters
    for name, value in resumed.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_the_calibration_metrics_skip_the_base_energies_while_every_adapter_is_zero(monkeypatch):
    """F is 0 while B = 0, so logging it at initialize must not pay d_out·d_in² per module for the base energies
    (more than ten minutes for one 70B block on 2 CPU cores); once the adapter moved they are computed, once."""
    import folora_ds.controller.controller as controller_module

    calls = []
    real = controller_module.base_energy_per_module

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(controller_module, "base_energy_per_module", counting)
    model, controller = calibrated_controller(FoLoRAConfig(refresh_interval=0))
    assert controller.measured_forgetting() == 0.0 and calls == []
    controller.initialize_lora_a()
    optimizer = GatedAdamW(folora_param_groups(model), lr=3e-2)
    controller.attach(optimizer)
    _train(model, controller, optimizer, 2)
    first = controller.measured_forgetting()
    assert first > 0 and calls == [1]
    assert controller.measured_forgetting() == first and calls == [1]  # kept
