"""folora_ds.method.gated_adamw: GatedAdamW (Variants A and B) against torch's AdamW and the explicit gated formula."""

from __future__ import annotations

import io
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from folora_ds.method.eigensolve import GeneralizedEigenResult, solve_generalized_eigenproblem
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups
from folora_ds.method.peft_layers import lora_a_weight, lora_b_weight, lora_layers
from folora_ds.method.projector import Projector, build_projector, projector_shard
from folora_ds.method.spectral import effective_tau, gate_values
from folora_ds.training.models import build_tiny_llama

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- helpers
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, seed: int) -> torch.Tensor:
    generator = _generator(seed)
    x = torch.randn(3 * d, d, generator=generator, dtype=F64) * (torch.rand(d, generator=generator, dtype=F64) + 0.1)
    return x.mT @ x / (3 * d)


def _solve(d: int, seed: int, c_pre: torch.Tensor | None = None, ridge: float = 1e-3) -> GeneralizedEigenResult:
    return solve_generalized_eigenproblem(_spd(d, seed), _spd(d, seed + 1000) if c_pre is None else c_pre,
                                          ridge=ridge)


def _gated_projector(d: int, seed: int, *, k: int | None = None, tau: float = 1.0) -> Projector:
    """A rational-gate projector from a real generalized solve (gates well inside (0, 1))."""
    result = _solve(d, seed)
    gates = gate_values(result.eigenvalues, kind="rational",
                        tau=effective_tau(result.eigenvalues, tau, "relative_median"))
    return build_projector(result, gates, k)


def _ones_projector(d: int, seed: int) -> Projector:
    """All gates 1 in a non-trivial basis: P_g = I."""
    result = _solve(d, seed)
    return build_projector(result, torch.ones(d, dtype=F64))


def _dense(projector: Projector) -> torch.Tensor:
    """P_g = I − (C̃V_k)·diag(1 − g_k)·V_kᵀ as a dense (d, d) matrix."""
    d = projector.dim
    return torch.eye(d, dtype=projector.v.dtype) - projector.c_tilde_v @ torch.diag(1 - projector.gates) @ \
        projector.v.mT


def _params(shapes: list[tuple[int, ...]], seed: int) -> list[torch.nn.Parameter]:
    generator = _generator(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=F64)) for shape in shapes]


def _clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _grads(shapes: list[tuple[int, ...]], steps: int, seed: int) -> list[list[torch.Tensor]]:
    """A fixed gradient sequence: grads[step][param] (independent of the parameters, so runs can be compared)."""
    generator = _generator(seed)
    return [[torch.randn(*shape, generator=generator, dtype=F64) for shape in shapes] for _ in range(steps)]


def _run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    optimizer.step()


def _only(values: dict[str, float]) -> float:
    """The single entry of a per-parameter dict (whatever name an unnamed parameter gets)."""
    (value,) = values.values()
    return value


def _assert_same(left: list[torch.Tensor], right: list[torch.Tensor], atol: float = 1e-6) -> None:
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol)


SHAPES = [(4, 10), (3, 10), (10, 4), (7,)]  # two LoRA-A like, one LoRA-B like, one bias


def _groups(params, *, gated: bool, lr_a: float = 1e-2, lr_b: float = 3e-3, weight_decay: float | None = None):
    """Param groups with different lr: (A-like params, gated or not), (the rest)."""
    first = {"params": params[:2], "lr": lr_a}
    second = {"params": params[2:], "lr": lr_b}
    if gated:
        first["gated"] = True
        first["param_names"] = ["layer0.lora_A", "layer1.lora_A"]
        second["param_names"] = ["layer0.lora_B", "bias"]
    if weight_decay is not None:
        second["weight_decay"] = weight_decay
    return [first, second]


# ---------------------------------------------------------------------------------------------- equals AdamW
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("variant", ["A", "B"])
def test_without_projectors_equals_torch_adamw(weight_decay, amsgrad, maximize, variant):
    params = _params(SHAPES, seed=0)
    reference_params = _clone(params)
    kwargs = dict(betas=(0.8, 0.95), eps=1e-7, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    optimizer = GatedAdamW(_groups(params, gated=True, weight_decay=0.05), variant=variant, **kwargs)
    reference = torch.optim.AdamW(_groups(reference_params, gated=False, weight_decay=0.05), **kwargs)
    for grads in _grads(SHAPES, steps=20, seed=1):
        _run(optimizer, params, grads)
        _run(reference, reference_params, grads)
        _assert_same(params, reference_params)
    for param, reference_param in zip(params, reference_params):
        state, reference_state = optimizer.state[param], reference.state[reference_param]
        torch.testing.assert_close(state["exp_avg"], reference_state["exp_avg"], rtol=0, atol=1e-12)
        torch.testing.assert_close(state["exp_avg_sq"], reference_state["exp_avg_sq"], rtol=0, atol=1e-12)
    assert optimizer.gated_step_counts() == {"layer0.lora_A": 0, "layer1.lora_A": 0}
    assert optimizer.update_norm_ratios() == {}


def test_defaults_match_torch_adamw():
    params = _params(SHAPES, seed=2)
    reference_params = _clone(params)
    optimizer, reference = GatedAdamW(params), torch.optim.AdamW(reference_params)
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert optimizer.defaults[key] == reference.defaults[key], key
    for grads in _grads(SHAPES, steps=5, seed=3):
        _run(optimizer, params, grads)
        _run(reference, reference_params, grads)
    _assert_same(params, reference_params)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_projectors_with_all_gates_one_equal_torch_adamw(weight_decay, amsgrad, maximize):
    params = _params(SHAPES, seed=4)
    reference_params = _clone(params)
    kwargs = dict(weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    optimizer = GatedAdamW(_groups(params, gated=True), **kwargs)
    reference = torch.optim.AdamW(_groups(reference_params, gated=False), **kwargs)
    optimizer.set_projector(params[0], _ones_projector(10, seed=5))
    optimizer.set_projector(params[1], _ones_projector(10, seed=6))
    for step, grads in enumerate(_grads(SHAPES, steps=20, seed=7)):
        if step == 10:  # a refresh mid-training, still all ones, in another basis
            optimizer.set_projector(params[0], _ones_projector(10, seed=8))
        _run(optimizer, params, grads)
        _run(reference, reference_params, grads)
        _assert_same(params, reference_params)
    assert optimizer.gated_step_counts() == {"layer0.lora_A": 20, "layer1.lora_A": 20}
    for ratio in optimizer.update_norm_ratios().values():
        assert ratio == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------- the gated step
@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_variant_a_step_equals_explicit_formula(k, amsgrad):
    """A ← A·(1 − lr·wd) − lr·(u·P_g),  u = m̂/(√v̂ + ε), moments of the raw gradient, over 3 steps."""
    r, d = 4, 12
    lr, (beta1, beta2), eps, weight_decay = 0.05, (0.9, 0.99), 1e-8, 0.1
    (param,) = _params([(r, d)], seed=10)
    projector = _gated_projector(d, seed=11, k=k)
    p_g = _dense(projector)
    optimizer = GatedAdamW([{"params": [param], "gated": True}], lr=lr, betas=(beta1, beta2), eps=eps,
                           weight_decay=weight_decay, amsgrad=amsgrad)
    optimizer.set_projector(param, projector)
    expected = param.detach().clone()
    m, v, v_max = torch.zeros(r, d, dtype=F64), torch.zeros(r, d, dtype=F64), torch.zeros(r, d, dtype=F64)
    for step, (grad,) in enumerate(_grads([(r, d)], steps=3, seed=12), start=1):
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        v_max = torch.maximum(v_max, v)
        m_hat = m / (1 - beta1**step)
        v_hat = (v_max if amsgrad else v) / (1 - beta2**step)
        u = m_hat / (v_hat.sqrt() + eps)
        expected = expected * (1 - lr * weight_decay) - lr * (u @ p_g)
        _run(optimizer, [param], [grad])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(optimizer.state[param]["exp_avg"], m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(optimizer.state[param]["exp_avg_sq"], v, rtol=1e-12, atol=1e-14)
        ratio = (u @ p_g).norm() / u.norm()
        assert _only(optimizer.update_norm_ratios()) == pytest.approx(float(ratio), rel=1e-9)
    # the gate did something: the result differs from plain AdamW
    assert float((p_g - torch.eye(d, dtype=F64)).abs().max()) > 0.1


def test_variant_a_does_not_gate_weight_decay():
    """With zero gradients the Adam update is 0, so only the (ungated) decay moves A: A·(1 − lr·wd)."""
    (param,) = _params([(3, 8)], seed=13)
    start = param.detach().clone()
    optimizer = GatedAdamW([{"params": [param], "gated": True}], lr=0.1, weight_decay=0.5)
    optimizer.set_projector(param, _gated_projector(8, seed=14, tau=100.0))
    _run(optimizer, [param], [torch.zeros(3, 8, dtype=F64)])
    torch.testing.assert_close(param.detach(), start * 0.95, rtol=1e-14, atol=0)


def test_refresh_keeps_moments_in_variant_a():
    (param,) = _params([(4, 10)], seed=15)
    optimizer = GatedAdamW([{"params": [param], "gated": True}], amsgrad=True)
    optimizer.set_projector(param, _gated_projector(10, seed=16))
    assert optimizer.state[param]["projector_refreshes"] == 1
    for (grad,) in _grads([(4, 10)], steps=3, seed=17):
        _run(optimizer, [param], [grad])
    state = optimizer.state[param]
    before = {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    step = state["step"]
    new = _gated_projector(10, seed=18)
    optimizer.set_projector(param, new)
    for key, value in before.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert state["step"] == step
    assert state["projector_refreshes"] == 2
    assert state["gated_steps"] == 3
    current = optimizer.projector(param)
    torch.testing.assert_close(current.v, new.v, rtol=0, atol=0)
    torch.testing.assert_close(current.c_tilde_v, new.c_tilde_v, rtol=0, atol=0)
    torch.testing.assert_close(current.gates, new.gates, rtol=0, atol=0)


def test_projector_is_cast_to_the_parameter_dtype():
    param = torch.nn.Parameter(torch.randn(3, 6, generator=_generator(19)))  # float32
    optimizer = GatedAdamW([{"params": [param], "gated": True}])
    assert optimizer.projector(param) is None
    optimizer.set_projector(param, _gated_projector(6, seed=20))  # float64 projector
    assert optimizer.projector(param).v.dtype == torch.float32
    _run(optimizer, [param], [torch.randn(3, 6, generator=_generator(21))])
    assert bool(torch.isfinite(param).all())


def test_gated_step_counts_and_update_norm_ratios():
    params = _params([(4, 10), (3, 10), (10, 4)], seed=22)
    optimizer = GatedAdamW([
        {"params": params[:2], "gated": True, "param_names": ["with_projector", "without_projector"]},
        {"params": params[2:], "param_names": ["lora_B"]},
    ])
    assert optimizer.gated_step_counts() == {"with_projector": 0, "without_projector": 0}
    optimizer.set_projector(params[0], _gated_projector(10, seed=23))
    grads = _grads([(4, 10), (3, 10), (10, 4)], steps=5, seed=24)
    for step_grads in grads:
        _run(optimizer, params, step_grads)
    counts = optimizer.gated_step_counts()
    assert counts == {"with_projector": 5, "without_projector": 0}  # non-gated groups are not listed
    ratios = optimizer.update_norm_ratios()
    assert set(ratios) == {"with_projector"}
    assert math.isfinite(ratios["with_projector"]) and ratios["with_projector"] > 0
    # a step in which the gated param has no gradient is not counted
    params[0].grad = None
    params[1].grad = grads[0][1].clone()
    optimizer.step()
    assert optimizer.gated_step_counts()["with_projector"] == 5


@pytest.mark.parametrize("variant", ["A", "B"])
def test_cap_update_norm_keeps_rows_no_longer_than_the_ungated_update(variant):
    """An ill-conditioned C̃ makes the oblique P_g lengthen rows; with the cap no row grows (lr=1, wd=0).

    C_pre = diag(1, 1e-4) and one useful direction v ∝ (0.01, 1): the two C̃-orthonormal directions are nearly
    parallel in the Euclidean sense, so closing the useless one lengthens an update along e_1 about 50-fold.
    """
    d, r = 2, 3
    c_pre = torch.diag(torch.tensor([1.0, 1e-4], dtype=F64))
    useful = c_pre @ torch.tensor([0.01, 1.0], dtype=F64)
    result = solve_generalized_eigenproblem(torch.outer(useful, useful), c_pre, ridge=1e-6)
    gates = gate_values(result.eigenvalues, kind="hard", tau=1e-4)
    assert gates.tolist() == [0.0, 1.0]
    projector = build_projector(result, gates)
    grads = [[grad * torch.tensor([1.0, 1e-3], dtype=F64)] for (grad,) in _grads([(r, d)], steps=3, seed=27)]

    def run(cap: bool) -> list[torch.Tensor]:
        (param,) = _params([(r, d)], seed=28)
        optimizer = GatedAdamW([{"params": [param], "gated": True}], lr=1.0, weight_decay=0.0, variant=variant,
                               cap_update_norm=cap)
        (plain,) = _clone([param])
        reference = GatedAdamW([{"params": [plain], "gated": True}], lr=1.0, weight_decay=0.0, variant=variant)
        optimizer.set_projector(param, projector)
        reference.set_projector(plain, build_projector(result, torch.ones(d, dtype=F64)))  # g ≡ 1: ungated
        ratios = []
        for (grad,) in grads:
            before, plain_before = param.detach().clone(), plain.detach().clone()
            _run(optimizer, [param], [grad])
            _run(reference, [plain], [grad])
            ungated_rows = (plain.detach() - plain_before).norm(dim=-1)
            ratios.append((param.detach() - before).norm(dim=-1) / ungated_rows)
            if cap:
                assert _only(optimizer.update_norm_ratios()) <= 1 + 1e-9
        return ratios

    assert max(float(ratio.max()) for ratio in run(cap=False)) > 1.5  # the caveat is real here
    for ratio in run(cap=True):
        assert bool((ratio <= 1 + 1e-9).all()), ratio


# ---------------------------------------------------------------------------------------------- Variant B
def _identity_like_basis(d: int) -> GeneralizedEigenResult:
    """C_pre = I and diagonal C_task with ridge 0: V is a signed permutation, C̃V = V."""
    c_task = torch.diag(torch.linspace(0.5, 3.0, d, dtype=F64).flip(0))
    return solve_generalized_eigenproblem(c_task, torch.eye(d, dtype=F64), ridge=0.0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_variant_b_with_identity_like_basis_and_unit_gates_equals_adamw(weight_decay, amsgrad):
    d = 10
    result = _identity_like_basis(d)
    assert torch.equal(result.eigenvectors.abs().sum(0), torch.ones(d, dtype=F64))  # a signed permutation
    projector = build_projector(result, torch.ones(d, dtype=F64))
    params = _params(SHAPES, seed=30)
    reference_params = _clone(params)
    kwargs = dict(weight_decay=weight_decay, amsgrad=amsgrad)
    optimizer = GatedAdamW(_groups(params, gated=True), variant="B", **kwargs)
    reference = torch.optim.AdamW(_groups(reference_params, gated=False), **kwargs)
    optimizer.set_projector(params[0], projector)
    optimizer.set_projector(params[1], Projector(torch.eye(d, dtype=F64), torch.eye(d, dtype=F64),
                                                 torch.ones(d, dtype=F64)))
    for grads in _grads(SHAPES, steps=20, seed=31):
        _run(optimizer, params, grads)
        _run(reference, reference_params, grads)
        _assert_same(params, reference_params)
    assert optimizer.gated_step_counts() == {"layer0.lora_A": 20, "layer1.lora_A": 20}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_variant_b_with_unit_gates_is_adamw_in_spectral_coordinates(weight_decay):
    """Z = A·C̃V and ∂L/∂Z = G·V: Variant B with g ≡ 1 is AdamW on Z, mapped back by A = Z·Vᵀ."""
    r, d = 4, 9
    result = _solve(d, seed=32)
    v = result.eigenvectors
    (param,) = _params([(r, d)], seed=33)
    z = torch.nn.Parameter((param.detach() @ result.c_tilde_v).clone())
    optimizer = GatedAdamW([{"params": [param], "gated": True}], lr=1e-2, weight_decay=weight_decay,
                           variant="B")
    reference = torch.optim.AdamW([z], lr=1e-2, weight_decay=weight_decay)
    optimizer.set_projector(param, build_projector(result, torch.ones(d, dtype=F64)))
    for (grad,) in _grads([(r, d)], steps=10, seed=34):
        _run(optimizer, [param], [grad])
        _run(reference, [z], [grad @ v])
        torch.testing.assert_close(param.detach(), z.detach() @ v.mT, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(optimizer.state[param]["exp_avg"], reference.state[z]["exp_avg"], rtol=1e-12,
                               atol=1e-14)


def test_variant_b_gated_step_equals_explicit_formula():
    """ΔA = −lr·(g ⊙ u_Z)·Vᵀ with u_Z from the moments of G·V (wd = 0), over 3 steps."""
    r, d = 3, 8
    lr, (beta1, beta2), eps = 0.05, (0.9, 0.999), 1e-8
    projector = _gated_projector(d, seed=35)
    (param,) = _params([(r, d)], seed=36)
    optimizer = GatedAdamW([{"params": [param], "gated": True}], lr=lr, weight_decay=0.0, variant="B")
    optimizer.set_projector(param, projector)
    expected = param.detach().clone()
    m, s = torch.zeros(r, d, dtype=F64), torch.zeros(r, d, dtype=F64)
    for step, (grad,) in enumerate(_grads([(r, d)], steps=3, seed=37), start=1):
        g_z = grad @ projector.v
        m, s = beta1 * m + (1 - beta1) * g_z, beta2 * s + (1 - beta2) * g_z**2
        u_z = (m / (1 - beta1**step)) / ((s / (1 - beta2**step)).sqrt() + eps)
        expected = expected - lr * (projector.gates * u_z) @ projector.v.mT
        _run(optimizer, [param], [grad])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)


def test_variant_b_refresh_rotates_first_moment_exactly():
    """At a refresh with fixed C_pre, m ← m·T with T = (C̃V_old)ᵀ V_new, v ← v·(T∘T); m stays G-linear exact."""
    r, d = 4, 10
    c_pre = _spd(d, seed=40)
    old = _solve(d, seed=41, c_pre=c_pre)
    new = _solve(d, seed=42, c_pre=c_pre)
    transform = old.c_tilde_v.mT @ new.eigenvectors
    torch.testing.assert_close(transform.mT @ transform, torch.eye(d, dtype=F64), rtol=0, atol=1e-10)

    (param,) = _params([(r, d)], seed=43)
    optimizer = GatedAdamW([{"params": [param], "gated": True}], variant="B", amsgrad=True)
    optimizer.set_projector(param, build_projector(old, torch.full((d,), 0.7, dtype=F64)))
    grads = _grads([(r, d)], steps=4, seed=44)
    m_a = torch.zeros(r, d, dtype=F64)  # the first moment in A coordinates, by hand
    for (grad,) in grads:
        _run(optimizer, [param], [grad])
        m_a = 0.9 * m_a + 0.1 * grad
    state = optimizer.state[param]
    m_old, v_old, v_max_old = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), state["max_exp_avg_sq"].clone()
    torch.testing.assert_close(m_old, m_a @ old.eigenvectors, rtol=1e-12, atol=1e-14)

    optimizer.set_projector(param, build_projector(new, torch.full((d,), 0.7, dtype=F64)))
    torch.testing.assert_close(state["exp_avg"], m_old @ transform, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["exp_avg"], m_a @ new.eigenvectors, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state["exp_avg_sq"], v_old @ (transform * transform), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["max_exp_avg_sq"], v_max_old @ (transform * transform), rtol=1e-12,
                               atol=1e-14)
    assert state["projector_refreshes"] == 2


def test_variant_b_first_projector_after_plain_steps_rotates_into_spectral_coordinates():
    r, d = 3, 7
    result = _solve(d, seed=45)
    (param,) = _params([(r, d)], seed=46)
    optimizer = GatedAdamW([{"params": [param], "gated": True}], variant="B")
    for (grad,) in _grads([(r, d)], steps=2, seed=47):
        _run(optimizer, [param], [grad])
    m_a = optimizer.state[param]["exp_avg"].clone()
    optimizer.set_projector(param, build_projector(result, torch.ones(d, dtype=F64)))
    torch.testing.assert_close(optimizer.state[param]["exp_avg"], m_a @ result.eigenvectors, rtol=1e-12,
                               atol=1e-14)


def test_variant_b_rejects_a_low_rank_projector():
    (param,) = _params([(3, 8)], seed=48)
    optimizer = GatedAdamW([{"params": [param], "gated": True, "param_names": ["blk.q.lora_A"]}], variant="B")
    with pytest.raises(ValueError, match="Variant B") as caught:
        optimizer.set_projector(param, _gated_projector(8, seed=49, k=3))
    assert "blk.q.lora_A" in str(caught.value)
    assert optimizer.projector(param) is None


# ---------------------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("variant", ["A", "B"])
def test_state_dict_round_trip_continues_identically(variant):
    shapes = [(4, 10), (3, 10), (10, 4), (7,)]
    params = _params(shapes, seed=50)
    optimizer = GatedAdamW(_groups(params, gated=True), variant=variant, amsgrad=True, weight_decay=0.05)
    optimizer.set_projector(params[0], _gated_projector(10, seed=51))
    optimizer.set_projector(params[1], _gated_projector(10, seed=52))
    grads = _grads(shapes, steps=6, seed=53)
    for step_grads in grads[:3]:
        _run(optimizer, params, step_grads)
    optimizer.set_projector(params[0], _gated_projector(10, seed=54))  # a refresh before saving

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twins = _clone(params)
    twin = GatedAdamW(_groups(twins, gated=True), variant=variant, amsgrad=True, weight_decay=0.05)
    twin.load_state_dict(saved)

    for param, twin_param in zip(params[:2], twins[:2]):
        original, restored = optimizer.projector(param), twin.projector(twin_param)
        assert restored is not None
        for name in ("c_tilde_v", "v", "gates"):
            torch.testing.assert_close(getattr(restored, name), getattr(original, name), rtol=0, atol=0)
    assert twin.gated_step_counts() == optimizer.gated_step_counts() == {"layer0.lora_A": 3, "layer1.lora_A": 3}
    assert twin.state[twins[0]]["projector_refreshes"] == 2 and twin.state[twins[1]]["projector_refreshes"] == 1

    for step_grads in grads[3:]:
        _run(optimizer, params, step_grads)
        _run(twin, twins, step_grads)
    _assert_same(params, twins, atol=0)
    assert twin.gated_step_counts() == optimizer.gated_step_counts() == {"layer0.lora_A": 6, "layer1.lora_A": 6}


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("index", "d_in", "seed", "named", "detail"), [
    (2, 4, 60, "LoRA-A", "layer0.lora_B"),  # a non-gated param: the message says only LoRA-A is gated
    (1, 9, 62, "layer1.lora_A", "d_in=9"),  # a projector of the wrong width: the param and the width are named
])
def test_set_projector_on_a_wrong_param_or_width_names_the_param(index, d_in, seed, named, detail):
    params = _params(SHAPES, seed=seed)
    optimizer = GatedAdamW(_groups(params, gated=True))
    with pytest.raises(ValueError, match=named) as caught:
        optimizer.set_projector(params[index], _gated_projector(d_in, seed=seed + 1))
    assert detail in str(caught.value)
    if index == 1:
        assert optimizer.projector(params[1]) is None  # nothing half-installed


def test_set_projector_on_an_unknown_param():
    params = _params(SHAPES, seed=64)
    optimizer = GatedAdamW(_groups(params, gated=True))
    (stranger,) = _params([(4, 10)], seed=65)
    with pytest.raises(ValueError, match="not managed"):
        optimizer.set_projector(stranger, _gated_projector(10, seed=66))


@pytest.mark.parametrize("shape", [(10,), (2, 3, 10)])
def test_gated_group_with_a_non_2d_param_is_rejected(shape):
    params = [*_params([(4, 10)], seed=67), *_params([shape], seed=68)]
    with pytest.raises(ValueError, match="blk.bias") as caught:
        GatedAdamW([{"params": params, "gated": True, "param_names": ["blk.lora_A", "blk.bias"]}])
    assert "2-D" in str(caught.value)


def test_param_names_must_match_params():
    with pytest.raises(ValueError, match="param_names"):
        GatedAdamW([{"params": _params([(4, 10), (3, 10)], seed=69), "gated": True, "param_names": ["only_one"]}])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"lr": -1e-3}, "lr"), ({"lr": math.nan}, "lr"), ({"eps": -1e-8}, "eps"), ({"betas": (1.0, 0.999)}, "betas"),
     ({"betas": (0.9, -0.1)}, "betas"), ({"betas": (0.9, 1.5)}, "betas"), ({"weight_decay": -0.1}, "weight_decay"),
     ({"weight_decay": math.nan}, "weight_decay"), ({"variant": "C"}, "variant"), ({"variant": "a"}, "variant")],
)
def test_invalid_hyperparameters_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GatedAdamW(_params([(4, 10)], seed=70), **kwargs)


def test_sparse_gradients_are_rejected():
    (param,) = _params([(4, 10)], seed=71)
    optimizer = GatedAdamW([param])
    param.grad = torch.zeros(4, 10, dtype=F64).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_step_returns_closure_loss():
    (param,) = _params([(4, 10)], seed=72)
    optimizer = GatedAdamW([param])

    def closure():
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None and float(loss.detach()) > 0


# ---------------------------------------------------------------------------------------------- param groups
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_model():
    torch.manual_seed(0)
    base = build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def test_folora_param_groups_split_lora_a_and_lora_b():
    model = _peft_model()
    groups = folora_param_groups(model, weight_decay=0.02)
    assert len(groups) == 2
    gated, plain = groups
    assert gated["gated"] is True and plain["gated"] is False
    assert gated["weight_decay"] == plain["weight_decay"] == 0.02

    layers = lora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    expected_a = [lora_a_weight(layer) for layer in layers.values()]
    expected_b = [lora_b_weight(layer) for layer in layers.values()]
    assert [id(p) for p in gated["params"]] == [id(p) for p in expected_a]
    assert [id(p) for p in plain["params"]] == [id(p) for p in expected_b]

    named = dict(model.named_parameters())
    for group, marker in ((gated, "lora_A"), (plain, "lora_B")):
        assert len(group["param_names"]) == len(group["params"])
        for name, param in zip(group["param_names"], group["params"]):
            assert named[name] is param
            assert marker in name
    for param in gated["params"]:
        assert param.shape[0] == 4  # (r, d_in)


def test_folora_param_groups_drive_gated_adamw():
    model = _peft_model()
    optimizer = GatedAdamW(folora_param_groups(model))
    first = optimizer.param_groups[0]
    name, param = first["param_names"][0], first["params"][0]
    optimizer.set_projector(param, _gated_projector(param.shape[1], seed=80).to(dtype=param.dtype))
    with pytest.raises(ValueError, match="LoRA-A"):
        optimizer.set_projector(optimizer.param_groups[1]["params"][0], _gated_projector(4, seed=81))
    ids = torch.randint(0, 64, (2, 6), generator=_generator(82))
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    counts = optimizer.gated_step_counts()
    assert counts[name] == 2
    assert set(counts) == set(first["param_names"])
    assert sum(counts.values()) == 2


def test_folora_param_groups_omit_empty_plain_group():
    model = _peft_model()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.requires_grad_(False)
    groups = folora_param_groups(model)
    assert len(groups) == 1 and groups[0]["gated"] is True


def test_gated_step_counts_keep_one_entry_per_param_without_param_names():
    """Without param_names every gated parameter must still get its own entry: a collision would hide steps."""
    first, second = _params([(4, 10), (3, 10)], seed=90)
    optimizer = GatedAdamW([{"params": [first], "gated": True}, {"params": [second], "gated": True}])
    optimizer.set_projector(first, _gated_projector(10, seed=91))
    for step_grads in _grads([(4, 10), (3, 10)], steps=3, seed=92):
        _run(optimizer, [first, second], step_grads)
    counts = optimizer.gated_step_counts()
    assert len(counts) == 2, counts
    assert sorted(counts.values()) == [0, 3], counts
    assert len(optimizer.update_norm_ratios()) == 1


def test_add_param_group_validates_gated_groups_like_the_constructor():
    (a,) = _params([(4, 10)], seed=93)
    optimizer = GatedAdamW([{"params": [a], "gated": True}])
    (bias,) = _params([(10,)], seed=94)
    with pytest.raises(ValueError, match="2-D"):
        optimizer.add_param_group({"params": [bias], "gated": True})


# ------------------------------------------------------------------------ a LoRA-A split along d_in (TP row layer)
def test_a_column_block_gated_with_the_other_blocks_coordinates_equals_the_whole_gate():
    """The left 7 of 12 columns of A, stepped alone with a projector shard, whose r x k partial coordinates are
    completed by the right block's (computed here from the same Adam formula): the whole A's gated step, columns
    0:7, over 3 steps; one sum per step."""
    r, d, left = 4, 12, 7
    lr, (beta1, beta2), eps = 0.05, (0.9, 0.99), 1e-8
    (whole,) = _params([(r, d)], seed=20)
    projector = _gated_projector(d, seed=21, k=5)
    block = torch.nn.Parameter(whole.detach()[:, :left].clone())
    reference = GatedAdamW([{"params": [whole], "gated": True}], lr=lr, betas=(beta1, beta2), eps=eps)
    reference.set_projector(whole, projector)
    m, v, sums = torch.zeros(r, d, dtype=F64), torch.zeros(r, d, dtype=F64), []

    def with_right_block(partial: torch.Tensor) -> torch.Tensor:
        sums.append(tuple(partial.shape))
        u = (m / (1 - beta1 ** len(sums))) / ((v / (1 - beta2 ** len(sums))).sqrt() + eps)
        return partial + u[:, left:] @ projector.c_tilde_v[left:]

    optimizer = GatedAdamW([{"params": [block], "gated": True}], lr=lr, betas=(beta1, beta2), eps=eps)
    optimizer.set_projector(block, projector_shard(projector, 0, left), sum_over_shards=with_right_block)
    for (grad,) in _grads([(r, d)], steps=3, seed=22):
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        _run(reference, [whole], [grad])
        _run(optimizer, [block], [grad[:, :left]])
        torch.testing.assert_close(block.detach(), whole.detach()[:, :left], rtol=1e-10, atol=1e-12)
    assert sums == [(r, 5)] * 3 and optimizer.gated_step_counts() == {"group 0 param 0": 3}


@pytest.mark.parametrize("options", [{"variant": "B"}, {"cap_update_norm": True}])
def test_a_column_block_needs_variant_a_without_the_cap(options):
    (block,) = _params([(4, 7)], seed=23)
    optimizer = GatedAdamW([{"params": [block], "gated": True}], **options)
    with pytest.raises(ValueError, match="is split along d_in; its gate supports variant='A' without cap"):
        optimizer.set_projector(block, _gated_projector(7, seed=24), sum_over_shards=lambda partial: partial)


# ---------------------------------------------------------------------------------------------- shared inputs
def _assert_last_step_was(optimizer, param, start, p_g, lr=0.05):
    """``param`` moved from ``start`` by exactly −lr·u·P_g, u = m̂/(√v̂ + ε) of its state (default betas, no decay)."""
    state = optimizer.state[param]
    u = state["exp_avg"] / (1 - 0.9 ** state["step"]) / (
        (state["exp_avg_sq"] / (1 - 0.999 ** state["step"])).sqrt() + 1e-8)
    torch.testing.assert_close(param.detach(), start - lr * (u @ p_g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [None, 6, 3])
def test_loras_of_one_input_are_gated_together_as_each_alone(k):
    """q/k/v-like LoRA-A's sharing one projector, beside one with its own: every update is its own u·P_g; the
    shared input's projector becomes one dense (d, d) matrix where 2k ≥ d (k = None, 6 of d = 12), none for k = 3."""
    d = 12
    params = _params([(4, d), (4, d), (2, d), (4, d)], seed=40)
    shared, alone = _gated_projector(d, seed=41, k=k), _gated_projector(d, seed=42, k=k)
    optimizer = GatedAdamW([{"params": params, "gated": True}], lr=0.05, weight_decay=0.0)
    for param in params[:3]:
        optimizer.set_projector(param, shared)
    optimizer.set_projector(params[3], alone)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    solo = [GatedAdamW([{"params": [p], "gated": True}], lr=0.05, weight_decay=0.0) for p in reference]
    for optimizer_alone, param, projector in zip(solo, reference, [shared] * 3 + [alone]):
        optimizer_alone.projector(param)  # None before: each gets a projector object of its own
        optimizer_alone.set_projector(param, Projector(projector.c_tilde_v.clone(), projector.v.clone(),
                                                       projector.gates.clone(), projector.base))
    for grads in _grads([tuple(p.shape) for p in params], steps=3, seed=43):
        _run(optimizer, params, grads)
        for optimizer_alone, param, grad in zip(solo, reference, grads):
            _run(optimizer_alone, [param], [grad])
        _assert_same(params, reference, atol=1e-12)
    assert set(optimizer.gated_step_counts().values()) == {3}
    dense = 0 if k == 3 else d * d * 8  # one matrix per input, float64
    assert optimizer.dense_projector_bytes() == 2 * dense
    before = [p.detach().clone() for p in params]
    _run(optimizer, params, [p.grad for p in params])  # one more step of all four, against the formula itself
    for param, start, p_g in zip(params, before, [_dense(shared)] * 3 + [_dense(alone)]):
        _assert_last_step_was(optimizer, param, start, p_g)


def _one_input_after_a_step(d: int, seed: int):
    """Two LoRA-A's (4, d) sharing one projector, after one step (its dense matrix built)."""
    params = _params([(4, d), (4, d)], seed=seed)
    optimizer = GatedAdamW([{"params": params, "gated": True}], lr=0.05, weight_decay=0.0)
    for param in params:
        optimizer.set_projector(param, _gated_projector(d, seed=seed + 1))
    _run(optimizer, params, [torch.ones(4, d, dtype=F64)] * 2)
    return params, optimizer


def test_a_refresh_replaces_the_dense_matrix_of_an_input():
    d = 10
    params, optimizer = _one_input_after_a_step(d, seed=44)
    new = _gated_projector(d, seed=46, tau=20.0)
    for param in params:
        optimizer.set_projector(param, new)
    before = [p.detach().clone() for p in params]
    exp_avg = [optimizer.state[p]["exp_avg"].clone() for p in params]
    _run(optimizer, params, [torch.ones(4, d, dtype=F64)] * 2)
    assert optimizer.dense_projector_bytes() == d * d * 8  # the old input's matrix is gone
    for param, start, m in zip(params, before, exp_avg):
        _assert_last_step_was(optimizer, param, start, _dense(new))
        assert not torch.equal(m, optimizer.state[param]["exp_avg"])


def test_a_loaded_state_gates_with_its_own_projectors_not_a_matrix_cached_before():
    d = 10
    params, optimizer = _one_input_after_a_step(d, seed=47)
    other = GatedAdamW([{"params": _clone(params), "gated": True}], lr=0.05, weight_decay=0.0)
    new = _gated_projector(d, seed=49, tau=20.0)
    for param in other.param_groups[0]["params"]:
        other.set_projector(param, new)
    optimizer.load_state_dict(other.state_dict())  # a resume: the saved projectors replace the installed ones
    before = [p.detach().clone() for p in params]
    _run(optimizer, params, [torch.ones(4, d, dtype=F64)] * 2)
    for param, start in zip(params, before):
        _assert_last_step_was(optimizer, param, start, _dense(new))
