"""LoRA initialisations FoLoRA is compared against, as pure torch functions of one layer (no model, no peft).

Notation: the base weight ``W`` is (out, in); a LoRA adapter adds ``s·B·A`` with ``A`` (r, in), ``B`` (out, r) and
scale ``s = lora_alpha / r``. Every function returns ``(A, B)``. Where the method *moves* a part of ``W`` into the
adapter (PiSSA-like inits: MiLoRA, LoRA-Null, SC-LoRA), the caller sets ``W ← W − s·B·A`` so the model's output is
unchanged at step 0; the exported adapter is then converted back to a plain LoRA delta of the untouched base
(``folora_ds.toolkit.methods``).

- **MiLoRA** (Wang et al. 2024): the *smallest* r singular triplets of W: the adapter starts in the directions
  the pretrained weight uses least.
- **LoRA-Null** (Tang et al. 2025, arXiv 2503.02659): the r eigenvectors of C_pre with the smallest eigenvalues
  (the near-null space N of the pretrained activations); the adapter starts as the rank-r part W·N·Nᵀ of W that
  those activations barely see, factored by its SVD.
- **SC-LoRA** (arXiv 2505.23724): the adapter's *output* is started in the subspace U (out, r) that carries much
  task output energy and little preserved-knowledge output energy: the top-r eigenvectors of
  (1 − β)·Σ_task/tr Σ_task − β·Σ_pre/tr Σ_pre with the output covariances Σ = W·C·Wᵀ; A = Uᵀ·W / s, B = U,
  so s·B·A = U·Uᵀ·W. The traces make β a share rather than a scale (our choice; the paper states β only).

PiSSA and CorDA come from peft itself (``init_lora_weights="pissa"`` / ``"corda"``).
"""

from __future__ import annotations

import math

import torch


def _check(weight: torch.Tensor, rank: int, scaling: float) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} must be in [1, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"LoRA scaling {scaling!r} must be a finite positive number")


def _check_covariance(name: str, covariance: torch.Tensor, dim: int) -> None:
    if covariance.shape != (dim, dim):
        raise ValueError(f"{name} must be ({dim}, {dim}) to match the weight's input, got {tuple(covariance.shape)}")
    if not torch.isfinite(covariance).all():
        raise ValueError(f"{name} has non-finite entries")


def _split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A = √(S/s)·Vᴴ, B = U·√(S/s): s·B·A = U·S·Vᴴ with both factors equally scaled (PiSSA's split)."""
    root = (s / scaling).sqrt()
    return root[:, None] * vh, u * root[None, :]


def milora_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA: (A, B) of the ``rank`` smallest singular triplets of ``weight`` (out, in), s·B·A = their sum.

    Returns:
        A (rank, in) and B (out, rank) in ``weight``'s dtype.
    """
    _check(weight, rank, scaling)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    a, b = _split_singular(u[:, -rank:], s[-rank:], vh[-rank:], scaling)
    return a.to(weight.dtype), b.to(weight.dtype)


def lora_null_factors(weight: torch.Tensor, c_pre: torch.Tensor, rank: int, scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Null: (A, B) with s·B·A = W·N·Nᵀ, N (in, rank) the eigenvectors of ``c_pre`` (in, in) with the
    smallest eigenvalues.

    Returns:
        A (rank, in) and B (out, rank) in ``weight``'s dtype.
    """
    _check(weight, rank, scaling)
    _check_covariance("C_pre", c_pre, weight.shape[1])
    _, vectors = torch.linalg.eigh(c_pre.double())
    null = vectors[:, :rank]
    u, s, vh = torch.linalg.svd(weight.double() @ null, full_matrices=False)  # W·N = U·S·(Vᴴ), rank ≤ r
    a, b = _split_singular(u, s, vh @ null.T, scaling)
    return a.to(weight.dtype), b.to(weight.dtype)


def sc_lora_factors(weight: torch.Tensor, c_task: torch.Tensor, c_pre: torch.Tensor, rank: int, scaling: float,
                    *, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """SC-LoRA: B = U, A = Uᵀ·W / s with U (out, rank) the top eigenvectors of
    (1 − β)·W C_task Wᵀ / tr(·) − β·W C_pre Wᵀ / tr(·).

    Returns:
        A (rank, in) and B (out, rank) in ``weight``'s dtype.
    """
    _check(weight, rank, scaling)
    _check_covariance("C_task", c_task, weight.shape[1])
    _check_covariance("C_pre", c_pre, weight.shape[1])
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")
    w = weight.double()
    task_out, pre_out = w @ c_task.double() @ w.T, w @ c_pre.double() @ w.T
    for name, matrix in (("task", task_out), ("pre", pre_out)):
        if not float(matrix.trace()) > 0:
            raise ValueError(f"the {name} output covariance has no energy (trace {float(matrix.trace())})")
    target = (1 - beta) * task_out / task_out.trace() - beta * pre_out / pre_out.trace()
    _, vectors = torch.linalg.eigh((target + target.T) / 2)
    subspace = vectors[:, -rank:].flip(-1)  # (out, rank), largest eigenvalue first
    return (subspace.T @ w / scaling).to(weight.dtype), subspace.to(weight.dtype)
