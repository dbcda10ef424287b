"""The task gradient's dominant directions (flexkd.method.directions), checked analytically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_two_ranks

from flexkd import distributed as fd
from flexkd.method.directions import (
    auto_k,
    direction_energy_share,
    gradient_gram,
    project_onto_directions,
    top_directions,
    unit_energy_share,
)
from flexkd.method.selection import select_top_k_units
from flexkd.stages.score import _unit_energy_diagnostics


def _rotation(d: int, seed: int) -> torch.Tensor:
    """[d, d] a random orthogonal matrix."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(r.diagonal())


def _gradients_in(subspace: torch.Tensor, batch: int = 4, tokens: int = 6, seed: int = 1) -> torch.Tensor:
    """[B, T, d] gradients that are combinations of the columns of ``subspace`` [d, r]."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 1.0, subspace.shape[1], dtype=torch.float64)  # distinct eigenvalues
    coefficients = torch.randn(batch, tokens, subspace.shape[1], generator=generator, dtype=torch.float64) * scales
    return coefficients @ subspace.T


def _largest_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spans of orthonormal [d, r] a and b."""
    cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))


def test_a_rank_one_gradient_gives_one_direction():
    direction = torch.zeros(8, dtype=torch.float64)
    direction[[1, 5]] = torch.tensor([0.6, -0.8], dtype=torch.float64)
    coefficients = torch.randn(3, 5, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = gradient_gram(coefficients * direction, torch.ones(3, 5))
    basis, spectrum = top_directions(gram, 3)
    assert direction_energy_share(spectrum, 1) == pytest.approx(1.0, abs=1e-12)
    assert auto_k(spectrum, 0.95, 8) == 1 and auto_k(spectrum, 1.0, 8) == 1
    # The sign rule: the entry of largest magnitude (-0.8) made positive.
    torch.testing.assert_close(basis[:, 0], -direction)
    assert float(spectrum[0]) == pytest.approx(float(coefficients.square().sum()))


def test_a_rotated_subspace_is_recovered_where_units_cannot_hold_it():
    d, rank = 16, 3
    subspace = _rotation(d, seed=0)[:, :rank]
    grad = _gradients_in(subspace)
    gram = gradient_gram(grad, torch.ones(grad.shape[:2]))
    basis, spectrum = top_directions(gram, rank)
    assert _largest_principal_angle(basis, subspace) < 1e-6
    assert direction_energy_share(spectrum, rank) == pytest.approx(1.0, abs=1e-12)
    assert auto_k(spectrum, 1.0, d) == rank

    # Even the best 3 units (largest diagonal of G: no unit selection holds more) miss much of it.
    best_units = select_top_k_units(gram.diagonal(), rank)
    units_share = unit_energy_share(gram, best_units)
    print(f"rotated rank-{rank} subspace in d={d}: top-{rank} directions 1.000, top-{rank} units {units_share:.3f}")
    assert units_share < 0.75
    unit_axes = torch.eye(d, dtype=torch.float64)[:, best_units]
    assert _largest_principal_angle(unit_axes, subspace) > 0.5


def test_energy_share_is_the_eigenvalue_share_of_the_gradient_energy():
    generator = torch.Generator().manual_seed(2)
    grad = torch.randn(5, 7, 12, generator=generator, dtype=torch.float64) * torch.linspace(4, 0.5, 12)
    mask = torch.rand(5, 7, generator=generator) > 0.3
    gram = gradient_gram(grad, mask)
    basis, spectrum = top_directions(gram, 12)
    valid = grad[mask]  # [N, d]
    total = valid.square().sum()
    torch.testing.assert_close(spectrum.sum(), gram.trace())
    for k in (1, 4, 12):
        projected_energy = (valid @ basis[:, :k]).square().sum() / total
        assert direction_energy_share(spectrum, k) == pytest.approx(float(projected_energy), rel=1e-10)
    units = torch.tensor([3, 0, 9])
    assert unit_energy_share(gram, units) == pytest.approx(float(valid[:, units].square().sum() / total), rel=1e-10)
    assert unit_energy_share(gram, units) <= direction_energy_share(spectrum, 3)  # Ky Fan


def test_auto_k_is_the_smallest_k_reaching_the_energy_and_is_capped():
    spectrum = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5], dtype=torch.float64)  # cumulative 0.5, 0.8, 0.9, 0.95, 1
    assert [auto_k(spectrum, energy, 5) for energy in (0.5, 0.51, 0.8, 0.9, 0.95, 0.96, 1.0)] == [1, 2, 2, 3, 4, 5, 5]
    assert auto_k(spectrum, 1.0, 3) == 3
    for energy in (0.0, 1.5):
        with pytest.raises(ValueError, match="energy"):
            auto_k(spectrum, energy, 5)
    with pytest.raises(ValueError, match="zero"):
        auto_k(torch.zeros(4, dtype=torch.float64), 0.9, 4)


def test_basis_is_orthonormal_sorted_and_deterministic():
    generator = torch.Generator().manual_seed(3)
    gram = gradient_gram(torch.randn(3, 9, 10, generator=generator), torch.ones(3, 9))
    basis, spectrum = top_directions(gram, 6)
    assert basis.shape == (10, 6) and spectrum.shape == (10,) and basis.dtype == torch.float64
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=torch.float64))
    assert (spectrum.diff() <= 0).all()
    torch.testing.assert_close(gram @ basis, basis * spectrum[:6])
    largest = basis.abs().argmax(dim=0)
    assert (basis[largest, torch.arange(6)] > 0).all()
    smaller, _ = top_directions(gram, 2)
    assert torch.equal(smaller, basis[:, :2])  # k_max=2 is a prefix of k_max=6


def test_projection_shape_and_prefix():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 16, generator=generator)
    basis = _rotation(16, seed=5)[:, :6]
    coordinates = project_onto_directions(hidden, basis)
    assert coordinates.shape == (2, 5, 6) and coordinates.dtype == torch.float64
    torch.testing.assert_close(coordinates, torch.einsum("btd,dk->btk", hidden.double(), basis))
    torch.testing.assert_close(project_onto_directions(hidden, basis[:, :3]), coordinates[..., :3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = project_onto_directions(hidden, basis.float())
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, coordinates.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="disagree"):
        project_onto_directions(hidden, basis[:8])


def test_masked_tokens_contribute_nothing():
    generator = torch.Generator().manual_seed(6)
    grad = torch.randn(2, 4, 5, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    reference = gradient_gram(grad, mask)
    grad[mask == 0] = float("inf")
    assert torch.equal(gradient_gram(grad, mask), reference)
    assert reference.dtype == torch.float64
    with pytest.raises(ValueError, match="mask"):
        gradient_gram(grad, torch.ones(4, 2))


def _two_rank_gram(out_dir: str, grad: torch.Tensor, mask: torch.Tensor) -> None:
    """One of two gloo ranks: the Gram of its half of the batch, summed over the ranks."""
    gram = gradient_gram(grad.chunk(2)[fd.rank()], mask.chunk(2)[fd.rank()])
    fd.all_reduce_sum_(gram)
    if fd.is_main_process():
        torch.save(gram, Path(out_dir) / "gram.pt")


def test_two_ranks_accumulate_and_all_reduce_to_the_one_process_gram(tmp_path):
    generator = torch.Generator().manual_seed(7)
    grad = torch.randn(6, 5, 8, generator=generator)
    mask = torch.rand(6, 5, generator=generator) > 0.3
    run_on_two_ranks(_two_rank_gram, str(tmp_path), grad, mask)
    reduced = torch.load(tmp_path / "gram.pt")
    torch.testing.assert_close(reduced, gradient_gram(grad, mask), rtol=1e-12, atol=1e-12)
    # The decomposition of the reduced sum is the one-process basis, signs included.
    torch.testing.assert_close(top_directions(reduced, 3)[0], top_directions(gradient_gram(grad, mask), 3)[0])


def test_a_unit_selection_records_the_energy_its_units_and_as_many_directions_keep():
    """Every selection gets the diagnostics: the chosen units' share of tr(G), and the (never
    smaller) share of the same number of top directions."""
    generator = torch.Generator().manual_seed(0)
    gradients = torch.randn(200, 3, generator=generator, dtype=torch.float64) @ _rotation(16, seed=1)[:, :3].T
    gram = gradients.T @ gradients  # rank 3 in rotated directions: no 3 units hold it all
    selected = {"layers": {"2": {"indices": [0, 1, 2], "k": 3}}}
    found = _unit_energy_diagnostics(selected, {"gram": {2: gram, 4: gram}}, k=3)
    entry = selected["layers"]["2"]
    assert set(found) == {2} and found[2][0].shape == (16, 3)
    assert entry["energy_directions"] == pytest.approx(1.0)
    assert entry["energy_units"] == pytest.approx(float(gram.diagonal()[:3].sum() / gram.trace()), abs=1e-6)
    assert entry["energy_units"] < 0.9
