"""The directions the score stage writes for ``selection.method: directions``, read back by the
targets stage (which keeps a copy beside its cache), distill and the cache checks. No Ray.

    directions/layer_<l>.safetensors
        basis     [d_T, k_max] float32  the top k_max eigenvectors of teacher layer l's task-gradient
                                        Gram G_l (flexkd.method.directions), by eigenvalue
                                        descending: student unit i learns coordinate i, U[:, i]^T h;
                                        any k <= k_max distills the first k
        spectrum  [d_T] float64         all eigenvalues of G_l, descending: what k 'auto' reads
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from flexkd.config.schema import ConfigError, SelectionConfig
from flexkd.method.directions import auto_k

DIRECTIONS_DIR = "directions"


def directions_file(directory: Path, layer: int) -> Path:
    return Path(directory) / DIRECTIONS_DIR / f"layer_{layer}.safetensors"


def write_directions(directory: Path, layer: int, basis: Tensor, spectrum: Tensor) -> Path:
    """Writes one layer's [d_T, k_max] basis (as float32) and [d_T] spectrum under ``directory``."""
    path = directions_file(directory, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"basis": basis.float().contiguous(), "spectrum": spectrum.contiguous()}, path)
    return path


def read_directions(directory: Path, layers: list[int]) -> dict[int, dict[str, Tensor]]:
    """Per layer ``{"basis": [d_T, k_max], "spectrum": [d_T]}``, as :func:`write_directions` wrote them."""
    directions = {}
    for layer in layers:
        path = directions_file(directory, layer)
        if not path.is_file():
            raise ConfigError(
                f"{directory}: no directions for teacher layer {layer} ({path.name}); "
                "was it made with selection.method 'directions'?"
            )
        directions[layer] = load_file(path)
    return directions


def distilled_ks(selection: SelectionConfig, k: int, spectra: dict[int, Tensor]) -> dict[int, int]:
    """How many directions each teacher layer distills: with k 'auto', the fewest whose share of
    the gradient energy reaches ``selection.energy``, at most ``k`` (the plan's k: the student's
    width); else ``k`` at every layer."""
    if selection.k != "auto":
        return dict.fromkeys(spectra, k)
    return {layer: auto_k(spectrum, selection.energy, k) for layer, spectrum in spectra.items()}
