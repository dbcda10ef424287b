"""What the teacher gives one distillation step: from a live teacher, or from the teacher-target
cache that the targets stage writes. Plain PyTorch and numpy, no Ray.

A cache row is a training row (``flexkd.data.ROW_SCHEMA``) plus the teacher's outputs for it;
n is the row's token count, P its number of response positions (positions t whose next token
t + 1 is a response token, in order), K = ``targets.top_k_logits``:

    teacher_units_<l>     list<float16>  [n * u] teacher layer l's hidden state at the row's n
                                         tokens, u stored units in the cache's unit order: the
                                         selected units, most important first (the top-k for
                                         any k <= k_max is a prefix), then with full_width the
                                         rest in index order; with selection.method directions
                                         the coordinates on its directions, U^T h, in order
    teacher_class_logits  list<float32>  [C] classification: the verbalizer logits, exact
    teacher_topk_logits   list<float32>  [P * K] generation: the K largest raw logits, descending
    teacher_topk_ids      list<int32>    [P * K] their token ids
    teacher_logsumexp     list<float32>  [P * T] logsumexp(z / t) of all V raw logits z, for each
                                         of the cache's T temperatures t: with the raw top-K,
                                         the exact teacher log-probs at each t
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flexkd.method.directions import project_onto_directions
from flexkd.method.objective import CachedTeacherLogits, class_logits, forward_scored, response_logits

FLOAT16_MAX = float(np.finfo(np.float16).max)


def units_column(layer: int) -> str:
    return f"teacher_units_{layer}"


def selected_features(hidden: Tensor, selection: Tensor) -> Tensor:
    """A layer's teacher features in pairing order: hidden [B, T, d_T] and selection [u] unit
    indices -> [B, T, u] those units; or selection [d_T, u] directions (selection.method
    directions) -> [B, T, u] the coordinates on them (float32)."""
    if selection.ndim == 2:
        return project_onto_directions(hidden, selection)
    return hidden.index_select(-1, selection)


@torch.no_grad()
def online_teacher_outputs(
    teacher, batch: dict[str, Tensor], task: str, layers: Sequence[int], selected: dict[int, Tensor], whole_hidden: bool
) -> tuple[Tensor, dict[int, Tensor]]:
    """A live teacher's logits at the scored positions (``flexkd.objective.forward_scored``) and,
    per layer, its selected units [B, T, k_sel] in importance order, or its coordinates on the
    selected directions (:func:`selected_features`), or the whole hidden state [B, T, d_T] for
    the cka/projector baselines."""
    logits, hidden = forward_scored(teacher, batch, task, list(layers))
    features = {
        layer: value if whole_hidden else selected_features(value, selected[layer]) for layer, value in hidden.items()
    }
    return logits, features


def target_columns(
    logits: Tensor,
    hidden: dict[int, Tensor],
    batch: dict[str, Tensor],
    unit_order: dict[int, Tensor],
    task: str,
    verbalizer_ids: Tensor | None,
    top_k: int,
    temperatures: Sequence[float] = (1.0,),
) -> dict[str, list[np.ndarray]]:
    """The cache columns (module docstring) of each row of a batch, from one teacher forward.

    Args:
        logits: [B, T, V], or only at the scored positions (``flexkd.objective.forward_scored``);
            hidden: layer -> [B, T, d_T]; batch: as ``flexkd.data.collate_batch`` returns it;
            unit_order: layer -> [u] the unit indices to store, in order, or [d_T, u] the
            directions whose coordinates to store (:func:`selected_features`).
    Returns:
        column name -> one flat numpy array per row.
    """
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    columns: dict[str, list[np.ndarray]] = {}
    for layer, order in unit_order.items():
        # Half precision: a stored unit is compared by correlation, which fp16's 3 digits serve;
        # clamping keeps a rare huge activation finite rather than inf.
        units = selected_features(hidden[layer], order).float().clamp(-FLOAT16_MAX, FLOAT16_MAX).half().cpu()
        columns[units_column(layer)] = [units[row, :length].reshape(-1).numpy() for row, length in enumerate(lengths)]
    if task == "classification":
        scores = class_logits(logits, batch["attention_mask"], verbalizer_ids).float().cpu()
        columns["teacher_class_logits"] = [row.numpy() for row in scores]
        return columns
    positions_per_row = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
    scales = torch.tensor(temperatures, dtype=torch.float32, device=logits.device).view(1, -1, 1)
    top_logits, top_ids, normalizers = [], [], []
    for row_logits in response_logits(logits, batch["labels"])[0].float().split(positions_per_row):  # [P, V] each
        top = torch.topk(row_logits, top_k, dim=-1)
        top_logits.append(top.values.reshape(-1).cpu().numpy())
        top_ids.append(top.indices.to(torch.int32).reshape(-1).cpu().numpy())
        normalizers.append(torch.logsumexp(row_logits.unsqueeze(1) / scales, dim=-1).reshape(-1).cpu().numpy())
    columns |= {"teacher_topk_logits": top_logits, "teacher_topk_ids": top_ids, "teacher_logsumexp": normalizers}
    return columns


def cached_teacher_outputs(
    rows: dict[str, Any],
    batch: dict[str, Tensor],
    task: str,
    stored_units: dict[int, int],
    k: int,
    inverse_order: dict[int, Tensor] | None,
    top_k: int,
    device: torch.device,
    temperatures: Sequence[float] = (1.0,),
    temperature: float = 1.0,
) -> tuple[CachedTeacherLogits, dict[int, Tensor]]:
    """Tensors for ``flexkd.objective.distillation_loss`` from a batch of cache rows.

    Args:
        rows: the batch's columns as Ray Data's numpy batches give them (one array per row).
        batch: ``collate_batch`` of the same rows (its width T sets the padding).
        stored_units: layer -> u, units per token in the cache; k: units a trial distills (at
            most; a layer that stores fewer gives all it stores).
        inverse_order: layer -> positions of the stored units to read, in order: for the
            whole-hidden baselines the [d_T] permutation putting the cached units back in index
            order, or the [k] positions of another selection's units in a full-width cache;
            None reads the first k.
        temperatures: those of the cache's normalizers; the one nearest ``temperature`` (the
            loss's) is used, exact if equal.
    Returns:
        teacher logits (:class:`CachedTeacherLogits`) and per layer the teacher features,
        [B, T, k] (or [B, T, d_T] in index order), float32, zero on padding.
    """
    height, width = batch["input_ids"].shape
    real = (
        batch["attention_mask"].bool().cpu().numpy()
    )  # [B, T]; row-major, its True cells are the rows' tokens in order
    lengths = real.sum(axis=1)
    features = {}
    for layer, units in stored_units.items():
        keep = units if inverse_order is not None else min(k, units)  # k 'auto' may store fewer than the plan's k
        stored = [len(flat) for flat in rows[units_column(layer)]]
        if stored != (lengths * units).tolist():  # one scatter for the batch: a short row would shift every later one
            raise ValueError(
                f"teacher-target cache layer {layer}: rows store {stored} values, the batch's tokens x "
                f"{units} units are {(lengths * units).tolist()}"
            )
        tokens = np.concatenate(list(rows[units_column(layer)])).astype(np.float16, copy=False).reshape(-1, units)
        padded = np.zeros((height, width, keep), dtype=np.float16)
        padded[real] = tokens[:, :keep]
        values = torch.from_numpy(padded).to(device=device, dtype=torch.float32)
        features[layer] = values if inverse_order is None else values.index_select(-1, inverse_order[layer].to(device))
    if task == "classification":
        scores = torch.from_numpy(np.stack([np.asarray(row, dtype=np.float32) for row in rows["teacher_class_logits"]]))
        return CachedTeacherLogits(class_scores=scores.to(device)), features
    logits = np.concatenate([np.asarray(row, dtype=np.float32) for row in rows["teacher_topk_logits"]])
    ids = np.concatenate([np.asarray(row, dtype=np.int64) for row in rows["teacher_topk_ids"]])
    anchor = nearest_temperature(temperatures, temperature)
    normalizers = np.concatenate(
        [
            np.asarray(row, dtype=np.float32).reshape(-1, len(temperatures))[:, anchor]
            for row in rows["teacher_logsumexp"]
        ]
    )
    cached = CachedTeacherLogits(
        topk_logits=torch.from_numpy(logits.reshape(-1, top_k)).to(device),
        topk_ids=torch.from_numpy(ids.reshape(-1, top_k)).to(device),
        logsumexp=torch.from_numpy(normalizers).to(device),
        logsumexp_temperature=temperatures[anchor],
    )
    return cached, features


def nearest_temperature(temperatures: Sequence[float], temperature: float) -> int:
    """Index of the stored temperature closest to ``temperature`` in 1 / t (the softmax's scale)."""
    return min(range(len(temperatures)), key=lambda index: abs(1 / temperatures[index] - 1 / temperature))
