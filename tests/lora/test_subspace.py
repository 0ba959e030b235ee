"""qlora_lab.lora.subspace: the LoRA paper's subspace similarity and amplification factor."""

import math

import pytest
import torch

from qlora_lab.lora import subspace


def test_right_singular_vectors_are_orthonormal_and_ordered():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 40, generator=g)
    v = subspace.right_singular_vectors(a)
    assert v.shape == (8, 40)
    assert torch.allclose(v @ v.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
    # the first row is the direction a stretches most
    stretch = torch.linalg.vector_norm(a.double() @ v.T, dim=0)
    assert torch.all(stretch[:-1] >= stretch[1:])


def test_similarity_of_a_subspace_with_itself_and_with_a_containing_one():
    g = torch.Generator().manual_seed(1)
    a8 = torch.randn(8, 64, generator=g)
    grid = subspace.similarity_grid(a8, a8)
    assert torch.allclose(torch.diagonal(grid), torch.ones(8, dtype=torch.float64), atol=1e-10)
    # A rank-64 matrix whose rows include a8's row space contains every subspace of a8.
    a64 = torch.cat([a8 * 10, torch.randn(56, 64, generator=g)])
    assert subspace.subspace_similarity(a8, a64, 8, 64) == pytest.approx(1.0, abs=1e-10)


def test_orthogonal_subspaces_have_zero_similarity_and_grid_matches_definition():
    eye = torch.eye(10)
    assert subspace.subspace_similarity(eye[:3] * torch.tensor([[3.], [2.], [1.]]), eye[3:7], 3, 4) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(2)
    a1, a2 = torch.randn(4, 12, generator=g), torch.randn(6, 12, generator=g)
    v1, v2 = subspace.right_singular_vectors(a1), subspace.right_singular_vectors(a2)
    grid = subspace.similarity_grid(a1, a2)
    for i in range(1, 5):
        for j in range(1, 7):
            direct = torch.linalg.matrix_norm(v1[:i] @ v2[:j].T) ** 2 / min(i, j)
            assert grid[i - 1, j - 1].item() == pytest.approx(direct.item(), abs=1e-12)


def test_random_subspaces_overlap_about_max_i_j_over_n():
    assert subspace.random_similarity(576, 1, 8, trials=200) == pytest.approx(8 / 576, rel=0.3)


def test_projection_norms_detect_an_update_aligned_with_the_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 40, generator=g)
    u, s, vh = torch.linalg.svd(w)
    aligned = u[:, :2] @ vh[:2] * 0.1           # along W's top directions
    other = u[:, 38:40] @ vh[38:40] * 0.1         # along W's weakest directions
    p_aligned = subspace.projection_norms(w, aligned, r=2)
    p_other = subspace.projection_norms(w, other, r=2)
    assert p_aligned.on_update == pytest.approx(p_aligned.on_own_top, rel=1e-8)
    assert p_aligned.on_own_top == pytest.approx(float(torch.linalg.vector_norm(s[:2])), rel=1e-6)
    assert p_other.on_update == pytest.approx(float(torch.linalg.vector_norm(s[38:40])), rel=1e-6)
    assert p_other.amplification > p_aligned.amplification
    assert p_aligned.update == pytest.approx(0.1 * math.sqrt(2), rel=1e-6)
    assert p_aligned.on_random < p_aligned.on_own_top


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        subspace.similarity_grid(torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        subspace.right_singular_vectors([[1.0]])
    with pytest.raises(ValueError, match="different input sizes"):
        subspace.similarity_grid(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="max_i"):
        subspace.similarity_grid(torch.randn(2, 5), torch.randn(2, 5), max_i=3)
    with pytest.raises(ValueError, match="same shape"):
        subspace.projection_norms(torch.randn(4, 5), torch.randn(5, 4), r=1)
    with pytest.raises(ValueError, match="r must be"):
        subspace.projection_norms(torch.randn(4, 5), torch.randn(4, 5), r=0)
