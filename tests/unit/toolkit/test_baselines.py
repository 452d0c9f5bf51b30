"""The baseline inits' math: each (A, B) is what its paper asks for, checked against an independent construction."""

import pytest
import torch

from folora_ds.toolkit.baselines import lora_null_factors, milora_factors, sc_lora_factors


def _weight(out=12, inp=9, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _covariance(dim, seed, spectrum=None):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    values = torch.logspace(-3, 2, dim, dtype=torch.float64) if spectrum is None else spectrum
    return q @ torch.diag(values) @ q.T, q, values


def test_milora_takes_the_smallest_singular_triplets_split_evenly():
    weight, scaling = _weight(), 2.0
    a, b = milora_factors(weight, 3, scaling)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert a.shape == (3, 9) and b.shape == (12, 3)
    torch.testing.assert_close(scaling * b @ a, u[:, -3:] @ torch.diag(s[-3:]) @ vh[-3:])
    # the residual keeps exactly the top singular values
    residual = torch.linalg.svdvals(weight - scaling * b @ a)
    torch.testing.assert_close(residual[:6], s[:6])
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0))  # PiSSA's even split


def test_lora_null_is_the_weight_on_the_pretraining_null_space():
    weight, scaling = _weight(), 0.5
    c_pre, q, _ = _covariance(9, 1)  # eigenvalues ascending with q's columns
    a, b = lora_null_factors(weight, c_pre, 2, scaling)
    null = q[:, :2]
    torch.testing.assert_close(scaling * b @ a, weight @ null @ null.T)
    # the adapter part is invisible to the pretraining activations' main directions
    top = q[:, -4:]
    assert (scaling * b @ a @ top).abs().max() < 1e-10
    assert a.shape == (2, 9) and b.shape == (12, 2)


def test_sc_lora_starts_the_output_in_the_task_not_pretraining_subspace():
    weight, scaling = _weight(out=6, inp=6, seed=2), 1.0
    c_task, _, _ = _covariance(6, 3)
    c_pre, _, _ = _covariance(6, 4)
    a, b = sc_lora_factors(weight, c_task, c_pre, 2, scaling, beta=0.3)
    task_out, pre_out = weight @ c_task @ weight.T, weight @ c_pre @ weight.T
    target = 0.7 * task_out / task_out.trace() - 0.3 * pre_out / pre_out.trace()
    values, vectors = torch.linalg.eigh(target)
    expected = vectors[:, -2:] @ vectors[:, -2:].T
    torch.testing.assert_close(b @ b.T, expected)  # B spans the top subspace (orthonormal columns)
    torch.testing.assert_close(scaling * b @ a, expected @ weight)
    # β = 0 is the task-output PCA; β = 1 the least pretraining output
    a0, b0 = sc_lora_factors(weight, c_task, c_pre, 2, scaling, beta=0.0)
    _, task_vectors = torch.linalg.eigh(task_out)
    torch.testing.assert_close(b0 @ b0.T, task_vectors[:, -2:] @ task_vectors[:, -2:].T)


@pytest.mark.parametrize("call, match", [
    (lambda: milora_factors(torch.zeros(3), 1, 1.0), "out, in"),
    (lambda: milora_factors(torch.zeros(3, 4), 4, 1.0), "rank 4"),
    (lambda: milora_factors(torch.zeros(3, 4), 1, 0.0), "scaling"),
    (lambda: lora_null_factors(torch.zeros(3, 4), torch.eye(3), 1, 1.0), r"C_pre must be \(4, 4\)"),
    (lambda: lora_null_factors(torch.zeros(3, 4), torch.full((4, 4), float("nan")), 1, 1.0), "non-finite"),
    (lambda: sc_lora_factors(torch.ones(3, 4), torch.eye(4), torch.eye(4), 1, 1.0, beta=1.5), "beta"),
    (lambda: sc_lora_factors(torch.ones(3, 4), torch.zeros(4, 4), torch.eye(4), 1, 1.0), "task output"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
