"""folora_ds.method.covariance: masked input second moments per shared input, hook hygiene, the C_task EMA,
Conv1D inputs."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from folora_ds.method.covariance import CovarianceCollector, CovarianceEMA, CovarianceSums
from folora_ds.method.peft_layers import lora_layers
from folora_ds.training.models import build_tiny_llama

F64 = torch.float64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 64, 32, 48, 2
PREFIX = "base_model.model.model.layers"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- helpers
def _llama(seed: int = 0) -> nn.Module:
    base = build_tiny_llama(VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=LAYERS,
                            num_heads=4, num_kv_heads=2, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    # peft initialises B to zero; make the adapters non-trivial so they influence the outputs being compared.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.1)
    return model.eval()


def _batch(seed: int, *, batch: int = 3, seq: int = 9) -> dict[str, torch.Tensor]:
    """Random ids with right padding in rows 1 and 2 (row 0 is full)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, seq - 3:] = 0
    mask[2, seq - 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class _BaseInputRecorder:
    """Independent capture: forward pre-hooks on every LoRA layer's *base* layer, storing its input per forward."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self._handles = [layer.base_layer.register_forward_pre_hook(self._hook(name))
                         for name, layer in lora_layers(model).items()]

    def _hook(self, name: str):
        def hook(module, args):
            self.inputs.setdefault(name, []).append(args[0].detach().clone())
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _masked_second_moment(inputs: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Σ x xᵀ over tokens whose mask is 1, in float64, written as an explicit loop over kept rows."""
    d = inputs[0].shape[-1]
    total, tokens = torch.zeros(d, d, dtype=F64), 0
    for x, mask in zip(inputs, masks):
        kept = x.to(F64)[mask.bool()]  # (n_kept, d)
        for row in kept:
            total += torch.outer(row, row)
        tokens += kept.shape[0]
    return total, tokens


def _collect(model, batches, *, source="pre", dtype=torch.float32, labels=False):
    collector = CovarianceCollector(model, dtype=dtype)
    for batch in batches:
        extra = {"labels": batch["labels"]} if labels else {}
        with torch.no_grad(), collector.collect(source, attention_mask=batch["attention_mask"], **extra):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return collector


def _layer_name(index: int, module: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"{PREFIX}.{index}.{block}.{module}"


# ---------------------------------------------------------------------------------------------- sums and counts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_and_token_counts_equal_explicit_masked_second_moment_of_every_input(dtype):
    model = _llama()
    batches = [_batch(1), _batch(2)]
    recorder = _BaseInputRecorder(model)
    collector = _collect(model, batches, dtype=dtype)
    recorder.remove()

    masks = [b["attention_mask"] for b in batches]
    sums = collector.sums("pre")
    assert set(sums) == set(collector.keys())
    assert len(sums) == 4 * LAYERS
    for key, members in collector.members().items():
        for member in members:  # every sharing member really received the key's tensors
            assert all(torch.equal(a, b) for a, b in zip(recorder.inputs[member], recorder.inputs[key]))
        expected, tokens = _masked_second_moment(recorder.inputs[key], masks)
        assert tokens == int(sum(m.sum() for m in masks)) == 3 * 9 * 2 - 2 * (3 + 5)
        assert sums[key].sum.dtype == dtype
        assert sums[key].tokens.dtype == torch.int64 and int(sums[key].tokens) == tokens
        tolerance = 1e-12 if dtype == F64 else 1e-5
        atol = tolerance * expected.abs().max()
        torch.testing.assert_close(sums[key].sum.to(F64), expected, rtol=tolerance, atol=atol)
        torch.testing.assert_close(collector.covariance("pre", key).to(F64), expected / tokens, rtol=tolerance,
                                   atol=atol / tokens)
        # the padding rows carry real (non-zero) activations, so counting them would change the sums
        unmasked, _ = _masked_second_moment(recorder.inputs[key], [torch.ones_like(m) for m in masks])
        assert not torch.allclose(unmasked, expected, rtol=1e-3)


def test_without_a_mask_every_token_is_counted():
    model = _llama()
    batch = _batch(3)
    collector = CovarianceCollector(model)
    recorder = _BaseInputRecorder(model)
    with torch.no_grad(), collector.collect("task"):
        model(**batch)
    recorder.remove()
    assert collector.sums("pre") == {}
    for key, sums in collector.sums("task").items():
        expected, tokens = _masked_second_moment(recorder.inputs[key], [torch.ones(3, 9)])
        assert int(sums.tokens) == tokens == 27
        torch.testing.assert_close(sums.sum.to(F64), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_sources_accumulate_separately_and_reset_forgets_only_one_source():
    model = _llama()
    collector = CovarianceCollector(model)
    pre, task = _batch(4), _batch(5)
    with torch.no_grad():
        with collector.collect("pre", attention_mask=pre["attention_mask"]):
            model(**pre)
        with collector.collect("task", attention_mask=task["attention_mask"]):
            model(**task)
            model(**task)
    key = collector.keys()[0]
    assert int(collector.sums("pre")[key].tokens) == int(pre["attention_mask"].sum())
    assert int(collector.sums("task")[key].tokens) == 2 * int(task["attention_mask"].sum())
    members = collector.members()
    collector.reset("task")
    assert collector.sums("task") == {}
    assert int(collector.sums("pre")[key].tokens) == int(pre["attention_mask"].sum())
    assert collector.members() == members


def test_forward_outside_collect_context_is_not_counted():
    model = _llama()
    batch = _batch(6)
    collector = _collect(model, [batch])
    before = {key: (s.sum.clone(), int(s.tokens)) for key, s in collector.sums("pre").items()}
    with torch.no_grad():
        model(**_batch(7))
    for key, sums in collector.sums("pre").items():
        assert torch.equal(sums.sum, before[key][0]) and int(sums.tokens) == before[key][1]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpoint_recompute_during_backward_is_not_counted_twice(use_reentrant):
    model = _llama()
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    model.train()
    batch = _batch(8)
    collector = CovarianceCollector(model)
    recorder = _BaseInputRecorder(model)
    with collector.collect("task", attention_mask=batch["attention_mask"]):  # backward inside, as in training
        model(**batch, labels=batch["input_ids"]).loss.backward()
    recorder.remove()
    key = collector.keys()[0]
    assert len(recorder.inputs[key]) == 2  # the forward really was recomputed during backward
    assert lora_layers(model)[key].lora_A["default"].weight.grad is not None
    for sums in collector.sums("task").values():
        assert int(sums.tokens) == int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------- sharing
def test_qkv_share_one_key_and_gate_up_share_one_key():
    collector = _collect(_llama(), [_batch(1)])
    members = collector.members()
    expected = {}
    for i in range(LAYERS):
        expected[_layer_name(i, "q_proj")] = [_layer_name(i, m) for m in ("q_proj", "k_proj", "v_proj")]
        expected[_layer_name(i, "o_proj")] = [_layer_name(i, "o_proj")]
        expected[_layer_name(i, "gate_proj")] = [_layer_name(i, m) for m in ("gate_proj", "up_proj")]
        expected[_layer_name(i, "down_proj")] = [_layer_name(i, "down_proj")]
    assert members == expected
    assert collector.keys() == list(expected)  # first-forward order
    for i in range(LAYERS):
        for module in ("q_proj", "k_proj", "v_proj"):
            assert collector.key_of(_layer_name(i, module)) == _layer_name(i, "q_proj")
        for module in ("gate_proj", "up_proj"):
            assert collector.key_of(_layer_name(i, module)) == _layer_name(i, "gate_proj")
        assert collector.key_of(_layer_name(i, "down_proj")) == _layer_name(i, "down_proj")
    dims = collector.input_dims()
    assert dims[_layer_name(0, "q_proj")] == HIDDEN and dims[_layer_name(1, "gate_proj")] == HIDDEN
    assert dims[_layer_name(0, "down_proj")] == INTERMEDIATE


def test_preset_sharing_reproduces_discovered_statistics():
    model = _llama()
    batch = _batch(9)
    first = _collect(model, [batch])
    first.remove()
    second = CovarianceCollector(model)
    second.load_sharing(first.members(), first.input_dims())
    assert second.members() == first.members()  # readable before any forward
    with torch.no_grad(), second.collect("pre", attention_mask=batch["attention_mask"]):
        model(**batch)
    for key, sums in first.sums("pre").items():
        assert torch.equal(second.sums("pre")[key].sum, sums.sum)
        assert int(second.sums("pre")[key].tokens) == int(sums.tokens)


def test_preset_sharing_contradicted_by_data_flow_raises():
    model = _llama()
    q, o = _layer_name(0, "q_proj"), _layer_name(0, "o_proj")
    collector = CovarianceCollector(model)
    collector.load_sharing({q: [q, o]}, {q: HIDDEN})
    with pytest.raises(RuntimeError, match="o_proj.*received a different tensor"), torch.no_grad(), \
            collector.collect("pre"):
        model(**_batch(1))


def test_load_sharing_rejects_modules_that_are_not_lora_layers():
    collector = CovarianceCollector(_llama())
    with pytest.raises(ValueError, match="not LoRA layers"):
        collector.load_sharing({"model.embed_tokens": ["model.embed_tokens"]}, {"model.embed_tokens": 8})


def test_add_sums_adds_external_window_in_collector_dtype():
    model = _llama()
    batch = _batch(2)
    source = _collect(model, [batch])
    source.remove()
    target = CovarianceCollector(model, dtype=F64)
    target.load_sharing(source.members(), source.input_dims())
    key = source.keys()[0]
    window = source.sums("pre")[key]
    target.add_sums("task", key, window)
    target.add_sums("task", key, window)
    added = target.sums("task")[key]
    assert added.sum.dtype == F64
    assert int(added.tokens) == 2 * int(window.tokens)
    torch.testing.assert_close(added.sum, 2 * window.sum.to(F64))
    assert int(window.tokens) == int(batch["attention_mask"].sum())  # the added window itself is not modified


def test_add_sums_refuses_unknown_inputs_and_wrong_shapes():
    model = _llama()
    source = _collect(model, [_batch(2)])
    source.remove()
    target = CovarianceCollector(model)
    key = source.keys()[0]
    window = source.sums("pre")[key]
    with pytest.raises(KeyError, match="not a known input"):
        target.add_sums("task", key, window)  # before the sharing is known
    target.load_sharing(source.members(), source.input_dims())
    with pytest.raises(KeyError, match="not.a.key"):
        target.add_sums("task", "not.a.key", window)
    with pytest.raises(ValueError, match="has width"):
        target.add_sums("task", key, CovarianceSums(window.sum[0], window.tokens))
    assert target.sums("task") == {}


def test_labels_and_attention_mask_of_different_shapes_are_refused():
    model = _llama()
    batch = _batch(1)
    collector = CovarianceCollector(model)
    with pytest.raises(ValueError, match="labels .* and attention_mask .* same"):
        with collector.collect("task", attention_mask=batch["attention_mask"],
                               labels=batch["input_ids"][:, :5]):
            pass


def test_ema_state_with_an_invalid_decay_is_refused():
    ema = CovarianceEMA(0.5)
    with pytest.raises(ValueError, match="decay=1.5"):
        ema.load_state_dict({"decay": 1.5, "estimates": {}})


# ---------------------------------------------------------------------------------------------- hook hygiene
def _module_state(model: nn.Module) -> dict[str, tuple]:
    return {name: (sorted(vars(module)), len(module._forward_pre_hooks), len(module._forward_hooks))
            for name, module in model.named_modules()}


def test_outputs_are_bit_identical_and_modules_untouched_after_remove():
    model = _llama()
    batch = _batch(11)
    with torch.no_grad():
        before = model(**batch).logits
    state_before = _module_state(model)
    parameters_before = {name: p.detach().clone() for name, p in model.state_dict().items()}

    collector = CovarianceCollector(model)
    assert any(len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad():
        with collector.collect("pre", attention_mask=batch["attention_mask"]):
            during = model(**batch).logits
        attached = model(**batch).logits
    collector.remove()
    with torch.no_grad():
        after = model(**batch).logits

    assert torch.equal(during, before) and torch.equal(attached, before) and torch.equal(after, before)
    assert _module_state(model) == state_before  # no new attributes, no leftover hooks
    assert model.state_dict().keys() == parameters_before.keys()
    assert all(torch.equal(p, parameters_before[name]) for name, p in model.state_dict().items())
    assert collector.covariance("pre", collector.keys()[0]).shape == (HIDDEN, HIDDEN)  # still readable
    with torch.no_grad(), collector.collect("pre", attention_mask=batch["attention_mask"]):
        model(**batch)
    assert int(collector.sums("pre")[collector.keys()[0]].tokens) == int(batch["attention_mask"].sum())


def test_error_inside_collect_ends_the_context():
    model = _llama()
    collector = CovarianceCollector(model)
    with pytest.raises(ZeroDivisionError), collector.collect("pre"):
        raise ZeroDivisionError
    with torch.no_grad():
        model(**_batch(1))  # not collecting any more
    with pytest.raises(RuntimeError, match="no statistics have been collected"):
        collector.keys()
    with torch.no_grad(), collector.collect("task"):  # and a new context may start
        model(**_batch(1))
    assert collector.sums("task")


# ---------------------------------------------------------------------------------------------- labels mask
def test_labels_mask_counts_only_tokens_with_labels_that_are_also_attended():
    model = _llama()
    batches = []
    for seed in (21, 22):
        batch = _batch(seed)
        labels = batch["input_ids"].clone()
        labels[:, :4] = -100  # a "prompt" on every row, inside the attended tokens
        labels[2, -1] = 7  # a label on a padded position: must still not count (attention mask is 0)
        assert batch["attention_mask"][2, -1] == 0
        batch["labels"] = labels
        batches.append(batch)
    recorder = _BaseInputRecorder(model)
    collector = _collect(model, batches, source="task", labels=True)
    recorder.remove()
    masks = [b["attention_mask"].bool() & (b["labels"] != -100) for b in batches]
    for key, sums in collector.sums("task").items():
        expected, tokens = _masked_second_moment(recorder.inputs[key], masks)
        assert int(sums.tokens) == tokens == 2 * (9 - 4 + 6 - 4 + 4 - 4)
        torch.testing.assert_close(sums.sum.to(F64), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_labels_mask_alone_is_used_without_attention_mask():
    model = _llama()
    batch = _batch(23)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 2:5] = 1
    labels[1, 7] = 1
    collector = CovarianceCollector(model)
    with torch.no_grad(), collector.collect("task", labels=labels):
        model(input_ids=batch["input_ids"])
    assert {int(s.tokens) for s in collector.sums("task").values()} == {4}


# ---------------------------------------------------------------------------------------------- errors
def test_rejects_unsupported_statistics_dtype():
    with pytest.raises(ValueError, match="float32 or float64"):
        CovarianceCollector(_llama(), dtype=torch.float16)


def test_rejects_model_without_lora_layers():
    with pytest.raises(ValueError, match="has no LoRA layers"):
        CovarianceCollector(nn.Sequential(nn.Linear(3, 3)))


def test_rejects_unknown_source_and_nested_contexts():
    collector = CovarianceCollector(_llama())
    with pytest.raises(ValueError, match="source 'train'"), collector.collect("train"):
        pass
    with collector.collect("pre"):
        with pytest.raises(RuntimeError, match="cannot be nested"), collector.collect("task"):
            pass


def test_mask_shape_mismatch_raises_naming_the_input():
    model = _llama()
    batch = _batch(1)
    collector = CovarianceCollector(model)
    with pytest.raises(ValueError, match=r"q_proj'.*does not match the token mask \(3, 8\)"), torch.no_grad(), \
            collector.collect("pre", attention_mask=batch["attention_mask"][:, :8]):
        model(**batch)


def test_input_width_change_raises():
    model = _llama()
    collector = _collect(model, [_batch(1)])
    name = _layer_name(0, "o_proj")
    layer = dict(model.named_modules())[name]
    with pytest.raises(ValueError, match=rf"o_proj'.*width changed from {HIDDEN} to 7"), torch.no_grad(), \
            collector.collect("pre"):
        layer(torch.randn(2, 3, 7))


def test_input_passed_by_keyword_raises_type_error():
    model = _llama()
    collector = CovarianceCollector(model)
    layer = dict(model.named_modules())[_layer_name(0, "o_proj")]
    with pytest.raises(TypeError, match="first positional argument"), torch.no_grad(), collector.collect("pre"):
        layer(x=torch.randn(2, 3, HIDDEN))


def test_zero_counted_tokens_raise_on_covariance():
    model = _llama()
    batch = _batch(1)
    collector = CovarianceCollector(model)
    with torch.no_grad(), collector.collect("pre", attention_mask=torch.zeros_like(batch["attention_mask"])):
        model(**batch)
    key = collector.keys()[0]
    assert int(collector.sums("pre")[key].tokens) == 0
    with pytest.raises(ValueError, match=r"zero unmasked tokens"):
        collector.covariance("pre", key)
    with pytest.raises(ValueError, match=r"'my.input': zero unmasked tokens"):
        CovarianceSums(torch.zeros(2, 2), torch.tensor(0)).covariance(name="my.input")


def test_lookups_of_unknown_keys_raise():
    model = _llama()
    collector = CovarianceCollector(model)
    with pytest.raises(RuntimeError, match="no statistics have been collected yet"):
        collector.keys()
    with pytest.raises(KeyError, match="has not been seen"):
        collector.key_of(_layer_name(0, "q_proj"))
    with torch.no_grad(), collector.collect("pre"):
        model(**_batch(1))
    with pytest.raises(KeyError, match="has not been seen"):
        collector.key_of("model.embed_tokens")
    with pytest.raises(KeyError, match="no 'task' statistics"):
        collector.covariance("task", collector.keys()[0])


def test_covariance_sums_divides_by_token_count():
    sums = CovarianceSums(torch.tensor([[4.0, 2.0], [2.0, 8.0]]), torch.tensor(4))
    assert torch.equal(sums.covariance(), torch.tensor([[1.0, 0.5], [0.5, 2.0]]))


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_matches_explicit_recursion_over_three_windows():
    decay = 0.7
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randn(4, 4, generator=generator, dtype=F64) for _ in range(3)]
    ema = CovarianceEMA(decay)
    assert "k" not in ema
    results = [ema.update("k", w).clone() for w in windows]  # in place: each result is the live estimate
    expected_1 = windows[0]
    expected_2 = decay * expected_1 + (1 - decay) * windows[1]
    expected_3 = decay * expected_2 + (1 - decay) * windows[2]
    expected_3_closed = decay**2 * windows[0] + decay * (1 - decay) * windows[1] + (1 - decay) * windows[2]
    for got, want in zip(results, [expected_1, expected_2, expected_3]):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ema["k"], expected_3_closed, rtol=1e-12, atol=1e-12)
    assert "k" in ema


def test_ema_first_update_copies_window_and_keys_are_independent():
    ema = CovarianceEMA(0.5)
    window = torch.ones(2, 2)
    ema.update("a", window)
    window.mul_(10)  # later changes to the caller's tensor do not leak into the estimate
    assert torch.equal(ema["a"], torch.ones(2, 2))
    ema.update("b", torch.full((3, 3), 4.0))
    assert torch.equal(ema["a"], torch.ones(2, 2))
    live = ema["b"]
    assert torch.equal(ema.update("b", torch.zeros(3, 3)), torch.full((3, 3), 2.0))
    assert live is ema["b"], "later updates are in place (no (d, d) temporaries)"


def test_ema_take_keeps_the_spent_window_itself():
    ema = CovarianceEMA(0.5)
    window = torch.ones(2, 2)
    assert ema.update("k", window, take=True) is window  # no (d, d) copy of a buffer the caller is done with
    assert torch.equal(ema.update("k", torch.full((2, 2), 3.0), take=True), torch.full((2, 2), 2.0))


def test_ema_decay_zero_keeps_only_the_latest_window():
    ema = CovarianceEMA(0.0)
    ema.update("k", torch.ones(2, 2))
    assert torch.equal(ema.update("k", torch.full((2, 2), 3.0)), torch.full((2, 2), 3.0))


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_ema_rejects_decay_outside_unit_interval(decay):
    with pytest.raises(ValueError, match=r"ema decay .* must be in \[0, 1\)"):
        CovarianceEMA(decay)


def test_ema_state_dict_round_trip_continues_identically():
    ema = CovarianceEMA(0.8)
    ema.update("k", torch.eye(3))
    restored = CovarianceEMA(0.1)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.8
    window = torch.full((3, 3), 2.0)
    assert torch.equal(restored.update("k", window), ema.update("k", window))


def test_ema_counts_the_rows_folded_in_while_every_window_says_how_many():
    ema = CovarianceEMA(0.9)
    ema.update("k", torch.eye(3), rows=5)
    ema.update("k", torch.eye(3), rows=7)
    assert ema.rows("k") == 12, "the EMA of two windows has rank <= 5 + 7"
    ema.update("k", torch.eye(3))
    assert ema.rows("k") is None, "one window of unknown rows leaves the bound unknown from then on"
    ema.update("k", torch.eye(3), rows=1)
    assert ema.rows("k") is None
    assert ema.rows("never seen") is None


def test_ema_rows_follow_the_state_dict_and_an_older_state_has_none():
    ema = CovarianceEMA(0.8)
    ema.update("k", torch.eye(3), rows=4)
    restored = CovarianceEMA(0.8)
    restored.load_state_dict(ema.state_dict())
    restored.update("k", torch.eye(3), rows=2)
    assert restored.rows("k") == 6
    older = {"decay": 0.8, "estimates": {"k": torch.eye(3)}}  # saved before rows were counted
    restored.load_state_dict(older)
    assert restored.rows("k") is None


@pytest.mark.parametrize("rows", [-1, 2.5, True])
def test_ema_refuses_rows_that_are_not_a_count(rows):
    with pytest.raises(ValueError, match=r"CovarianceEMA.update\('k'\): rows="):
        CovarianceEMA(0.5).update("k", torch.eye(2), rows=rows)


# ---------------------------------------------------------------------------------------------- GPT-2 Conv1D
def test_gpt2_conv1d_fan_in_fan_out_layers_collect_inputs_of_the_right_width():
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd = 24
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(GPT2LMHeadModel(config),
                               LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)).eval()
    batch = _batch(31)
    recorder = _BaseInputRecorder(model)
    collector = _collect(model, [batch])
    recorder.remove()
    prefix = "base_model.model.transformer.h"
    for i in range(2):
        assert collector.key_of(f"{prefix}.{i}.attn.c_attn") == f"{prefix}.{i}.attn.c_attn"
    dims = collector.input_dims()
    # Conv1D stores its weight as (in, out); the statistics must use the input width, not the weight's first dim
    assert dims[f"{prefix}.0.attn.c_attn"] == n_embd  # c_attn weight is (24, 72)
    assert dims[f"{prefix}.0.attn.c_proj"] == n_embd
    assert dims[f"{prefix}.0.mlp.c_proj"] == 4 * n_embd  # mlp.c_proj weight is (96, 24)
    assert len(collector.keys()) == 6
    for key, sums in collector.sums("pre").items():
        assert sums.sum.shape == (dims[key], dims[key])
        expected, tokens = _masked_second_moment(recorder.inputs[key], [batch["attention_mask"]])
        assert int(sums.tokens) == tokens
        torch.testing.assert_close(sums.sum.to(F64), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


# ---------------------------------------------------------------------------------------------- sampled statistics
def _sampled(model, batch, sample_tokens, seed):
    collector = CovarianceCollector(model, dtype=F64)
    with torch.no_grad(), collector.collect("task", attention_mask=batch["attention_mask"],
                                            sample_tokens=sample_tokens, generator=torch.Generator().manual_seed(seed)):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return collector


def test_sampled_statistics_count_that_many_unmasked_tokens_drawn_from_the_real_inputs():
    model = _llama()
    batch = _batch(3)  # 27 tokens, 19 unmasked
    recorder = _BaseInputRecorder(model)
    collector = _sampled(model, batch, 5, seed=1)
    recorder.remove()
    key = collector.keys()[0]
    sums = collector.sums("task")[key]
    assert int(sums.tokens) == 5
    rows = recorder.inputs[key][0].to(F64)[batch["attention_mask"].bool()]  # the 19 unmasked rows
    # Σxxᵀ of the 5 drawn rows: each drawn row is one of the unmasked rows, and together they give the sum
    eigenvalues = torch.linalg.eigvalsh(sums.sum)
    assert int((eigenvalues > 1e-9 * eigenvalues.max()).sum()) == 5, "five distinct token rows"
    onto_unmasked = torch.linalg.pinv(rows) @ rows  # projector onto the span of the unmasked token rows
    assert float((sums.sum - onto_unmasked @ sums.sum).abs().max()) < 1e-8, "a padding token was drawn"


def test_sampling_is_reproducible_for_a_seed_and_shared_by_modules_of_one_input():
    model = _llama()
    first = _sampled(model, _batch(4), 6, seed=2)
    again = _sampled(model, _batch(4), 6, seed=2)
    other = _sampled(model, _batch(4), 6, seed=3)
    for key in first.keys():
        torch.testing.assert_close(first.sums("task")[key].sum, again.sums("task")[key].sum, rtol=0, atol=0)
    assert any(not torch.equal(first.sums("task")[k].sum, other.sums("task")[k].sum) for k in first.keys())
    assert len(first.keys()) == 4 * LAYERS  # q/k/v and gate/up still share one key (one draw each)


def test_sampling_more_tokens_than_there_are_counts_every_token_exactly():
    model = _llama()
    batch = _batch(5)
    exact = _collect(model, [batch], source="task", dtype=F64)
    sampled = _sampled(model, batch, 1000, seed=0)
    for key in exact.keys():
        torch.testing.assert_close(sampled.sums("task")[key].sum, exact.sums("task")[key].sum, rtol=1e-12,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="sample_tokens=0"):
        with exact.collect("task", sample_tokens=0):
            pass
