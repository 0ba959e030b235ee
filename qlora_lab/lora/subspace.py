"""What rank does LoRA need, and what does the update do? The two measurements
of the LoRA paper's Sec. 7 (Hu et al. 2021, "Understanding the low-rank
updates"), for any pair of trained adapters.

**Subspace similarity between ranks (Sec. 7.2).** Train the same task at r=8
and at r=64. Take the right-singular vectors of each ``A`` (``r x in``): the
input directions the adapter reads, ordered by importance. With ``U_i`` the top
``i`` of the r=8 adapter and ``V_j`` the top ``j`` of the r=64 adapter, the
normalized subspace similarity is

    phi(A_8, A_64, i, j) = ||U_i^T V_j||_F^2 / min(i, j)   in [0, 1]

(1: one subspace contains the other; 0: orthogonal). For two random
subspaces of an ``n``-dimensional space it is about ``max(i, j) / n``. The
paper finds that the top direction is shared (phi > 0.5) and the rest mostly
is not: a very low rank already holds what the task needs.

**The amplification factor (Sec. 7.3).** Does the update ``dW`` follow the
frozen weight ``W``? Project ``W`` onto the ``r``-dimensional subspace of
``dW`` (``U``, ``V``: its top left and right singular vectors) and compare
norms: ``||dW||_F / ||U^T W V^T||_F``. If the update pointed where ``W`` is
already large, the projection would be large and the factor small; the paper
finds the projection small (``dW`` emphasises directions that ``W`` does not)
and the factor large, e.g. 6.91 / 0.32 = 21.5 for r = 4 (paper, Sec. 7.3,
GPT-3, layer 48). :func:`projection_norms` also gives the two references the
paper's Table 7 prints: ``W`` projected on its own top ``r`` directions and on
random ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _matrix(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 2-D floating-point matrix, got shape {tuple(x.shape)} and {x.dtype}")
    return x.detach().double()


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """Rows: the right-singular vectors of ``a`` (``r x n``), most important
    first (``r x n``, orthonormal rows)."""
    _, _, vh = torch.linalg.svd(_matrix(a, "a"), full_matrices=False)
    return vh


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """phi(a1, a2, i, j): how much of the top-``i`` right-singular subspace of
    ``a1`` lies in the top-``j`` one of ``a2`` (LoRA paper, Eq. 4)."""
    grid = similarity_grid(a1, a2, i, j)
    return float(grid[i - 1, j - 1])


def similarity_grid(a1: torch.Tensor, a2: torch.Tensor, max_i: int | None = None,
                    max_j: int | None = None) -> torch.Tensor:
    """phi(a1, a2, i, j) for i = 1..max_i and j = 1..max_j (a ``max_i x max_j``
    matrix, float64): the LoRA paper's Figure 3 heat map."""
    v1, v2 = right_singular_vectors(a1), right_singular_vectors(a2)
    if v1.shape[1] != v2.shape[1]:
        raise ValueError(f"the two adapters read different input sizes: {v1.shape[1]} and {v2.shape[1]}")
    max_i = v1.shape[0] if max_i is None else max_i
    max_j = v2.shape[0] if max_j is None else max_j
    for name, value, limit in (("max_i", max_i, v1.shape[0]), ("max_j", max_j, v2.shape[0])):
        if not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{name} must be an integer between 1 and the rank {limit}, got {value!r}")
    overlap = (v1[:max_i] @ v2[:max_j].T) ** 2  # squared cosines between directions
    # ||U_i^T V_j||_F^2 for every (i, j) at once: 2-D cumulative sums.
    cumulative = overlap.cumsum(0).cumsum(1)
    sizes = torch.minimum(torch.arange(1, max_i + 1).unsqueeze(1), torch.arange(1, max_j + 1).unsqueeze(0))
    return cumulative / sizes.double()


def random_similarity(n: int, i: int, j: int, trials: int = 20, seed: int = 0) -> float:
    """The reference: mean phi between random ``i``- and ``j``-dimensional
    subspaces of an ``n``-dimensional space (about ``max(i, j) / n``)."""
    g = torch.Generator().manual_seed(seed)
    values = [subspace_similarity(torch.randn(i, n, generator=g, dtype=torch.float64),
                                  torch.randn(j, n, generator=g, dtype=torch.float64), i, j) for _ in range(trials)]
    return sum(values) / trials


@dataclass(frozen=True)
class ProjectionNorms:
    """The paper's Table 7 for one weight: Frobenius norms of ``W`` projected
    onto ``r``-dimensional subspaces, and of ``W`` and ``dW``."""

    r: int
    on_update: float       # ||U^T W V^T||_F, U, V: top-r singular vectors of dW
    on_own_top: float      # the same with W's own top-r singular vectors
    on_random: float       # the same with random orthonormal directions
    weight: float          # ||W||_F
    update: float          # ||dW||_F

    @property
    def amplification(self) -> float:
        """``||dW||_F / ||U^T W V^T||_F``."""
        return self.update / self.on_update

    def __str__(self) -> str:
        return (f"r={self.r}: ||U^T W V^T|| on dW's directions {self.on_update:.4g}, on W's own top {self.on_own_top:.4g}, "
                f"on random {self.on_random:.4g}; ||W|| {self.weight:.4g}, ||dW|| {self.update:.4g}; "
                f"amplification {self.amplification:.4g}")


def _projected_norm(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(u.T @ w @ v))


def projection_norms(weight: torch.Tensor, delta: torch.Tensor, r: int, seed: int = 0) -> ProjectionNorms:
    """Project ``weight`` (``out x in``) onto the top-``r`` singular subspace of
    ``delta`` (same shape), of itself, and of a random pair of subspaces."""
    w, d = _matrix(weight, "weight"), _matrix(delta, "delta")
    if w.shape != d.shape:
        raise ValueError(f"weight {tuple(w.shape)} and delta {tuple(d.shape)} must have the same shape")
    if not isinstance(r, int) or not 1 <= r <= min(w.shape):
        raise ValueError(f"r must be an integer between 1 and {min(w.shape)}, got {r!r}")
    ud, _, vhd = torch.linalg.svd(d, full_matrices=False)
    uw, _, vhw = torch.linalg.svd(w, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    ur, _ = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g, dtype=torch.float64))
    vr, _ = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=torch.float64))
    return ProjectionNorms(
        r=r,
        on_update=_projected_norm(w, ud[:, :r], vhd[:r].T),
        on_own_top=_projected_norm(w, uw[:, :r], vhw[:r].T),
        on_random=_projected_norm(w, ur, vr),
        weight=float(torch.linalg.matrix_norm(w)),
        update=float(torch.linalg.matrix_norm(d)),
    )
