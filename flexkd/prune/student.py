"""Importance-guided student initialization: cut a Llama-family teacher down to the student's
shape, keeping what the task needs, so distillation starts from the teacher instead of noise.

The kept residual-stream units are an ordered selection: student unit i is teacher unit
``hidden_units[i]``. Used as the Flex-KD selection of the mapped layers, the correlation loss
then pairs each student unit with the very teacher unit it was cut from. Rank the units by
their task importance summed over the output of every block the student keeps (the ``residual``
pruning scores): a unit is removed from all blocks at once, and on SmolLM2 the last layer's |grad| alone keeps a student
whose last state barely correlates with the teacher's (0.02 against 0.16, see tests). MLP
channels and key/value groups are chosen per kept block by their own importance
(:mod:`flexkd.pruning_scores`), blocks uniformly, by how much they change the hidden state or by
what skipping them costs the task loss.
The result is a plain Hugging Face model of the teacher's class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from flexkd.method.selection import select_top_k_units
from flexkd.prune.scores import check_supported_architecture

LayerSelection = Literal["uniform", "importance", "perplexity"]
LAYER_SELECTIONS = ("uniform", "importance", "perplexity")
# The block score each ranked selection keeps the largest of (flexkd.prune.scores): how much a
# block changes the hidden state, or the task loss with the block skipped.
BLOCK_SCORE_KEYS = {"importance": "block_change", "perplexity": "skip_loss"}
# The pipeline-config field each target comes from (flexkd.resolve.prune_targets), so that an
# error names what to change in the pipeline file.
CONFIG_FIELDS = {
    "hidden_size": "student.architecture.hidden_size",
    "num_layers": "student.architecture.num_hidden_layers",
    "intermediate_size": "student.architecture.intermediate_size",
    "num_key_value_heads": "student.architecture.num_key_value_heads",
    "num_attention_heads": "student.architecture.num_attention_heads",
    "layer_selection": "student.layer_selection",
}


@dataclass(frozen=True)
class PruneTargets:
    """The student's shape. Heads go as whole KV groups, keeping the teacher's query/KV ratio, so
    ``num_attention_heads`` follows from ``num_key_value_heads`` (given, it must agree)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_key_value_heads: int
    layer_selection: LayerSelection = "uniform"
    num_attention_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "intermediate_size", "num_key_value_heads", "num_attention_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{CONFIG_FIELDS[name]} = {value!r} must be a positive integer")
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ValueError(
                f"{CONFIG_FIELDS['layer_selection']} = {self.layer_selection!r} is not one of {LAYER_SELECTIONS}"
            )
        if self.num_attention_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{CONFIG_FIELDS['num_key_value_heads']} = {self.num_key_value_heads} does not divide "
                f"num_attention_heads = {self.num_attention_heads}"
            )

    @classmethod
    def from_model_config(cls, config: PretrainedConfig, layer_selection: LayerSelection = "uniform") -> PruneTargets:
        """The shape of an existing config (e.g. the student's, resolved from the pipeline)."""
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            config.intermediate_size,
            config.num_key_value_heads,
            layer_selection,
            config.num_attention_heads,
        )

    def validate_for(self, teacher: PretrainedConfig) -> None:
        """Refuses, in one line naming the field, a shape the teacher cannot be cut to."""
        check_supported_architecture(teacher)
        for name, teacher_name in (
            ("hidden_size", "hidden_size"),
            ("num_layers", "num_hidden_layers"),
            ("intermediate_size", "intermediate_size"),
            ("num_key_value_heads", "num_key_value_heads"),
        ):
            if getattr(self, name) > getattr(teacher, teacher_name):
                raise ValueError(
                    f"{CONFIG_FIELDS[name]} = {getattr(self, name)} exceeds the teacher's "
                    f"{getattr(teacher, teacher_name)}"
                )
        queries_per_group = teacher.num_attention_heads // teacher.num_key_value_heads
        heads = self.num_key_value_heads * queries_per_group
        if self.num_attention_heads is not None and self.num_attention_heads != heads:
            raise ValueError(
                f"{CONFIG_FIELDS['num_attention_heads']} = {self.num_attention_heads} must be num_key_value_heads "
                f"x {queries_per_group} = {heads}: heads are pruned as whole groups of the teacher's "
                f"{queries_per_group} query heads per KV head"
            )
        if teacher.model_type == "llama" and self.hidden_size % heads:
            # LlamaConfig refuses this even with an explicit head_dim (the other families do not).
            raise ValueError(
                f"{CONFIG_FIELDS['hidden_size']} = {self.hidden_size} is not a multiple of the {heads} attention "
                f"heads that num_key_value_heads = {self.num_key_value_heads} keeps (LlamaConfig requires it)"
            )


def hidden_units_by_importance(importance_per_layer: Mapping[int, Tensor], k: int) -> Tensor:
    """The residual-stream units to keep: ordered top-k of the importance summed over layers.

    The residual stream is one basis shared by all blocks, so a pruned student keeps one set of
    units for all of them. Each layer's vector is divided by its sum before adding: gradient
    magnitudes differ by orders of magnitude across depth (the normed last state against the raw
    residual stream), and unnormalized the largest layer would choose alone.

    Args:
        importance_per_layer: layer -> [d_T] non-negative importance; for pruning, the rows of
            the collector's ``residual`` scores at the kept blocks, ``{b: residual[b] for b in kept}``.
        k: units to keep.

    Returns:
        [k] int64, most important first (student unit i = teacher unit result[i]).
    """
    if not importance_per_layer:
        raise ValueError("no importance vectors to aggregate")
    total = None
    for layer, importance in importance_per_layer.items():
        importance = torch.as_tensor(importance, dtype=torch.float64).flatten()
        mass = importance.sum()
        if not torch.isfinite(mass) or mass <= 0 or (importance < 0).any():
            raise ValueError(f"importance of layer {layer} must be finite, non-negative and not all zero")
        if total is not None and importance.shape != total.shape:
            raise ValueError(f"importance of layer {layer} has {importance.numel()} units, others {total.numel()}")
        total = importance / mass if total is None else total + importance / mass
    return select_top_k_units(total, k)


def kept_layer_indices(
    teacher_layers: int, student_layers: int, selection: LayerSelection = "uniform", block_scores: Tensor | None = None
) -> list[int]:
    """Teacher blocks (0-based, ascending) that the student keeps.

    ``uniform`` spreads them evenly from the first block to the last (block 0 writes the
    embedding into the residual stream and the last feeds the head; dropping either costs the
    most). The ranked selections keep the last block and the others with the largest
    ``block_scores`` ([L_T], the scores of ``BLOCK_SCORE_KEYS[selection]``): for ``importance``
    how much a block changes the hidden state (:func:`flexkd.prune.scores.block_change_sum`), for
    ``perplexity`` the task loss with the block skipped
    (:func:`flexkd.prune.scores.skipped_block_loss_sums`).
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(
            f"{CONFIG_FIELDS['num_layers']} = {student_layers} must be between 1 and the teacher's {teacher_layers}"
        )
    if selection == "uniform":
        if student_layers == 1:
            return [teacher_layers - 1]
        span, steps = teacher_layers - 1, student_layers - 1
        # Integer round-half-up of j * span / steps; a step of at least 1 keeps the indices distinct.
        return [(2 * j * span + steps) // (2 * steps) for j in range(student_layers)]
    if selection not in BLOCK_SCORE_KEYS:
        raise ValueError(f"{CONFIG_FIELDS['layer_selection']} = {selection!r} is not one of {LAYER_SELECTIONS}")
    if block_scores is None or block_scores.shape != (teacher_layers,):
        raise ValueError(
            f"{CONFIG_FIELDS['layer_selection']} = {selection!r} needs '{BLOCK_SCORE_KEYS[selection]}' scores "
            f"for all {teacher_layers} teacher blocks (flexkd.prune.scores)"
        )
    others = select_top_k_units(block_scores[:-1].float(), student_layers - 1) if student_layers > 1 else []
    return sorted([int(index) for index in others] + [teacher_layers - 1])


def pruned_student_layer_map(kept_layers: Sequence[int]) -> list[tuple[int, int]]:
    """(teacher, student) hidden-state indices pairing each student block with its source block:
    student block j (1-based) with teacher block ``kept_layers[j-1] + 1``."""
    return [(teacher + 1, student) for student, teacher in enumerate(kept_layers, start=1)]


# How each parameter is cut, dimension by dimension: by the kept residual units ("hidden"),
# query-head rows ("query"), key/value-head rows ("kv"), MLP channels ("channels"), or kept
# whole (None). Keys are relative to a block, or to the model for the top-level parameters.
_BLOCK_SLICES: dict[str, tuple[str | None, ...]] = {
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("query", "hidden"),
    "self_attn.q_proj.bias": ("query",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "query"),
    "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,),  # Qwen3: over head_dim, shared by all heads
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("channels", "hidden"),
    "mlp.gate_proj.bias": ("channels",),
    "mlp.up_proj.weight": ("channels", "hidden"),
    "mlp.up_proj.bias": ("channels",),
    "mlp.down_proj.weight": ("hidden", "channels"),
    "mlp.down_proj.bias": ("hidden",),
}
_TOP_SLICES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, "hidden"),
    "norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
    "score.weight": (None, "hidden"),  # sequence-classification head
    "score.bias": (None,),
}


def prune_llama(
    teacher: PreTrainedModel, hidden_units: Tensor, targets: PruneTargets, scores: Mapping[str, Tensor] | None = None
) -> PreTrainedModel:
    """A student cut out of ``teacher``: a fresh CPU model of the teacher's class, in eval mode.

    Args:
        teacher: a Llama-family causal LM or sequence classifier (left unchanged).
        hidden_units: [targets.hidden_size] ORDERED teacher residual units; student unit i is
            teacher unit ``hidden_units[i]`` (the Flex-KD pairing, so not sorted here).
        targets: the student's shape.
        scores: a :func:`~flexkd.pruning_scores.collect_pruning_scores` state (sums are enough:
            ranks within a layer do not depend on the count). Needed to drop MLP channels or
            KV groups, or for a ranked ``layer_selection`` (``BLOCK_SCORE_KEYS``).

    Note that RMSNorm over a subset of units is not the same function as over all of them (the
    mean square changes), so a narrower student's states differ from the teacher's at the same
    units before any training; keeping every unit (in any order) reproduces the teacher exactly.
    """
    config = teacher.config
    targets.validate_for(config)
    hidden_units = _checked_hidden_units(hidden_units, targets.hidden_size, config.hidden_size)
    kv_heads, queries_per_group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    head_dim = teacher_head_dim(config)
    needs = {
        "mlp": targets.intermediate_size < config.intermediate_size,
        "attention": targets.num_key_value_heads < kv_heads,
    }
    reasons = {
        "mlp": f"{CONFIG_FIELDS['intermediate_size']} = {targets.intermediate_size}",
        "attention": f"{CONFIG_FIELDS['num_key_value_heads']} = {targets.num_key_value_heads}",
    }
    block_key = BLOCK_SCORE_KEYS.get(targets.layer_selection)
    if block_key is not None:
        needs[block_key] = True
        reasons[block_key] = f"{CONFIG_FIELDS['layer_selection']} = {targets.layer_selection!r}"
    for key, needed in needs.items():
        if needed and (scores is None or key not in scores):
            source = "skipped_block_loss_sums" if key == "skip_loss" else "collect_pruning_scores"
            raise ValueError(f"{reasons[key]} needs '{key}' pruning scores ({source})")
    kept = kept_layer_indices(
        config.num_hidden_layers,
        targets.num_layers,
        targets.layer_selection,
        scores[block_key] if block_key is not None else None,
    )

    def top_sorted(key: str, layer: int, count: int, total: int) -> Tensor:
        if not needs[key]:
            return torch.arange(total)
        # Internal units: their order is free, so keep the teacher's (the top-k set, sorted).
        return select_top_k_units(scores[key][layer].float(), count).sort().values

    per_layer = {}
    for layer in kept:
        groups = top_sorted("attention", layer, targets.num_key_value_heads, kv_heads)
        query_heads = (groups[:, None] * queries_per_group + torch.arange(queries_per_group)).flatten()
        per_layer[layer] = {
            "hidden": hidden_units,
            "channels": top_sorted("mlp", layer, targets.intermediate_size, config.intermediate_size),
            "query": _head_rows(query_heads, head_dim),
            "kv": _head_rows(groups, head_dim),
        }

    prefix = f"{teacher.base_model_prefix}." if teacher.base_model is not teacher else ""
    state = {}
    for name, tensor in teacher.state_dict().items():
        relative = name.removeprefix(prefix)
        if relative.startswith("layers."):
            _, layer, inner = relative.split(".", 2)
            if int(layer) not in kept:
                continue
            spec, index = _BLOCK_SLICES.get(inner), per_layer[int(layer)]
            name = f"{prefix}layers.{kept.index(int(layer))}.{inner}"
        else:
            spec, index = _TOP_SLICES.get(relative), {"hidden": hidden_units}
        if spec is None:
            raise ValueError(f"cannot prune parameter {name!r}: not a weight of a llama-family model")
        state[name] = _take(tensor, spec, index)

    student = _fresh_model(teacher, pruned_model_config(config, targets, kept))
    student.load_state_dict(state, strict=True)
    return student.eval()


def _checked_hidden_units(hidden_units: Tensor, size: int, teacher_size: int) -> Tensor:
    hidden_units = torch.as_tensor(hidden_units).long().cpu()
    if hidden_units.shape != (size,):
        raise ValueError(
            f"hidden_units has shape {tuple(hidden_units.shape)}; {CONFIG_FIELDS['hidden_size']} = {size} "
            f"needs ({size},)"
        )
    if hidden_units.unique().numel() != size or not bool(((hidden_units >= 0) & (hidden_units < teacher_size)).all()):
        raise ValueError(f"hidden_units must be {size} distinct teacher units in 0..{teacher_size - 1}")
    return hidden_units


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Rows of a q/k/v projection (columns of o_proj) that belong to ``heads``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _take(tensor: Tensor, spec: tuple[str | None, ...], index: Mapping[str, Tensor]) -> Tensor:
    for dim, kind in enumerate(spec):
        if kind is not None:
            tensor = tensor.index_select(dim, index[kind].to(tensor.device))
    return tensor.detach().clone()


def teacher_head_dim(config: PretrainedConfig) -> int:
    """The width of one attention head, which a pruned student keeps (it drops whole heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pruned_model_config(config: PretrainedConfig, targets: PruneTargets, kept: Sequence[int]) -> PretrainedConfig:
    """The config of the student cut from a teacher with ``config``, keeping blocks ``kept``."""
    head_dim = teacher_head_dim(config)
    fields: dict[str, Any] = config.to_dict()
    fields.pop("quantization_config", None)
    heads = targets.num_key_value_heads * (config.num_attention_heads // config.num_key_value_heads)
    # head_dim is written explicitly: a derived hidden_size // heads would change with the width.
    fields.update(
        hidden_size=targets.hidden_size,
        intermediate_size=targets.intermediate_size,
        num_hidden_layers=len(kept),
        num_attention_heads=heads,
        num_key_value_heads=targets.num_key_value_heads,
        head_dim=head_dim,
    )
    if isinstance(fields.get("layer_types"), list):  # per-block attention kinds (sliding or full)
        fields["layer_types"] = [fields["layer_types"][layer] for layer in kept]
    return type(config).from_dict(fields)


def _fresh_model(teacher: PreTrainedModel, config: PretrainedConfig) -> PreTrainedModel:
    # Its random initial weights are all overwritten; fork_rng keeps the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        student = type(teacher)(config).to(dtype=teacher.dtype)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student
