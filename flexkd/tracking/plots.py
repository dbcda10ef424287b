"""Pictures that beat tables: the importance spectrum a user checks before trusting a selection."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np


def plot_importance(importance: dict[int, np.ndarray], k: int, path: Path) -> Path:
    """Sorted importance per teacher layer (log scale), with the top-k cut marked.

    A steep drop before the cut means a small subspace carries the task; a flat curve means
    the selection is close to arbitrary and a random subset would do as well.
    """
    figure, axis = plt.subplots(figsize=(7, 4))
    for layer, scores in sorted(importance.items()):
        ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
        axis.plot(np.arange(1, len(ordered) + 1), ordered / max(ordered[0], 1e-30), label=f"teacher layer {layer}")
    axis.axvline(k, color="black", linestyle="--", linewidth=1, label=f"k = {k}")
    axis.set_yscale("log")
    axis.set_xlabel("unit rank")
    axis.set_ylabel("importance / max")
    axis.set_title("Teacher unit importance, sorted")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
