"""Pictures that beat tables: the importance spectrum a user checks before trusting a selection."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np


def plot_importance(
    importance: dict[int, np.ndarray],
    k: int,
    path: Path,
    spectra: dict[int, np.ndarray] | None = None,
    chosen: dict[int, dict[str, float]] | None = None,
) -> Path:
    """Sorted importance per teacher layer (log scale), with the top-k cut marked.

    A steep drop before the cut means a small subspace carries the task; a flat curve means
    the selection is close to arbitrary and a random subset would do as well.

    With ``spectra`` (layer -> [d] eigenvalues of the task gradient's Gram G, descending; method
    directions) a second panel puts, per layer, the cumulative share of tr(G) held by the top
    directions beside the cumulative share of the sorted unit importance, and marks each layer's
    chosen k with the energy its directions and its top-k units keep (``chosen``: layer ->
    ``k``, ``energy_directions``, ``energy_units``). Directions far above units: the task lives
    in few directions that no few units hold.
    """
    spectra = spectra or {}
    figure, axes = plt.subplots(1, 2 if spectra else 1, figsize=(13, 5.5) if spectra else (7, 4), squeeze=False)
    axis = axes[0, 0]
    for layer, scores in sorted(importance.items()):
        ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
        axis.plot(np.arange(1, len(ordered) + 1), ordered / max(ordered[0], 1e-30), label=f"teacher layer {layer}")
    cut = "k_max" if spectra else "k"  # directions: the cap, below which each layer chooses its own k
    axis.axvline(k, color="black", linestyle="--", linewidth=1, label=f"{cut} = {k}")
    axis.set_yscale("log")
    axis.set_xlabel("unit rank")
    axis.set_ylabel("importance / max")
    axis.set_title("Teacher unit importance, sorted")
    axis.legend(fontsize=8)
    if spectra:
        _plot_cumulative_energy(axes[0, 1], importance, spectra, chosen or {})
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_cumulative_energy(
    axis, importance: dict[int, np.ndarray], spectra: dict[int, np.ndarray], chosen: dict[int, dict[str, float]]
) -> None:
    for index, (layer, spectrum) in enumerate(sorted(spectra.items())):
        color = f"C{index}"
        energy = np.cumsum(np.asarray(spectrum, dtype=np.float64)) / max(float(np.sum(spectrum)), 1e-300)
        units = np.sort(np.asarray(importance[layer], dtype=np.float64))[::-1]
        unit_share = np.cumsum(units) / max(float(units.sum()), 1e-300)
        ranks = np.arange(1, len(energy) + 1)
        row = chosen.get(layer)
        label = f"layer {layer} directions"
        if row is not None:
            label += f": k = {row['k']} keeps {row['energy_directions']:.2f} (top-k units {row['energy_units']:.2f})"
        axis.plot(ranks, energy, color=color, label=label)
        axis.plot(ranks, unit_share, color=color, linestyle=":", label=f"layer {layer} units (importance share)")
        if row is not None:
            axis.plot([row["k"]], [row["energy_directions"]], "o", color=color)
            axis.plot([row["k"]], [row["energy_units"]], "x", color=color)
    axis.set_xscale("log")
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("directions / units kept (rank)")
    axis.set_ylabel("cumulative share")
    axis.set_title("Share of the task-gradient energy tr(G)\nkept by the top-k directions (o) and top-k units (x)")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)  # below: the curves fill the panel
