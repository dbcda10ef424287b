"""Importance-guided student initialization: pruning a Llama-family teacher into a student."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flexkd.config.schema import TaskConfig
from flexkd.data.rows import collate_batch, tokenize_rows, verbalizer_token_ids
from flexkd.method.importance import unit_importance_sum
from flexkd.method.layers import forward_with_hidden_states
from flexkd.method.losses import causal_lm_loss, correlation_loss
from flexkd.method.objective import summed_task_loss
from flexkd.models.loading import fetch_demo_teacher, load_model, load_tokenizer
from flexkd.prune.scores import (
    PruningScoreCollector,
    block_change_sum,
    collect_pruning_scores,
    kv_group_importance_sum,
    merge_pruning_scores,
    mlp_channel_importance_sum,
    skipped_block,
    skipped_block_loss_sums,
)
from flexkd.prune.student import (
    PruneTargets,
    hidden_units_by_importance,
    kept_layer_indices,
    prune_llama,
    pruned_student_layer_map,
)

# model_type -> extra fields: tied embeddings, attention biases (qwen2), q/k norms (qwen3).
FAMILIES = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "mistral": {"model_type": "mistral"},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 16},  # its config defaults to 128
}


def _lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss over valid tokens (a sum over examples, as scoring needs)."""
    targets = torch.where(batch["attention_mask"][:, 1:].bool(), batch["input_ids"][:, 1:], -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
    )


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


TEXTS = ["the quick brown fox jumps over the lazy dog", "pruning keeps what matters", "a b c d e f g"]


@pytest.fixture
def teacher_and_scores(build_tiny_llama, tiny_tokenizer):
    """A frozen 6-block tiny teacher (so 4 blocks is two thirds) and its pruning scores."""

    def build(family: str = "llama"):
        teacher = build_tiny_llama(num_hidden_layers=6, **FAMILIES[family]).requires_grad_(False)
        scores = collect_pruning_scores(teacher, [_batch(tiny_tokenizer, TEXTS)], _lm_loss)
        return teacher, scores

    return build


# --- the pure scores ---------------------------------------------------------------------------


def test_kv_group_importance_is_the_sum_of_its_heads_channels():
    generator = torch.Generator().manual_seed(0)
    grad, act = torch.randn(2, 5, 4 * 3, generator=generator), torch.randn(2, 5, 4 * 3, generator=generator)
    mask = torch.ones(2, 5)
    per_channel = unit_importance_sum(grad, act, mask, "grad_x_act")
    expected = per_channel.view(2, 6).sum(dim=1)  # 2 KV groups of 2 query heads x 3 dims
    torch.testing.assert_close(kv_group_importance_sum(grad, act, mask, num_kv_heads=2), expected)
    with pytest.raises(ValueError, match="not divisible by 5 KV groups"):
        kv_group_importance_sum(grad, act, mask, num_kv_heads=5)


def test_pruning_scores_ignore_masked_tokens_even_if_they_hold_nan():
    generator = torch.Generator().manual_seed(1)
    grad, act = torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 6, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    dirty_grad, dirty_act = grad.clone(), act.clone()
    dirty_grad[mask == 0], dirty_act[mask == 0] = float("nan"), float("inf")
    for function in (mlp_channel_importance_sum, lambda g, a, m: kv_group_importance_sum(g, a, m, 3)):
        torch.testing.assert_close(function(dirty_grad, dirty_act, mask), function(grad, act, mask))
        assert (function(grad, act, mask) >= 0).all()
    torch.testing.assert_close(block_change_sum(dirty_act, dirty_act * 2, mask), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_block_change_is_one_minus_cosine():
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [3.0, 3.0]]])
    h_out = torch.tensor([[[5.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]])  # same, orthogonal, opposite
    assert block_change_sum(h_in, h_out, torch.ones(1, 3)).item() == pytest.approx(0.0 + 1.0 + 2.0)
    assert block_change_sum(h_in, h_out, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.0)


# --- the collector -----------------------------------------------------------------------------


def test_collector_scores_have_the_right_shapes_and_leave_the_teacher_untouched(build_tiny_llama, tiny_tokenizer):
    teacher = build_tiny_llama().requires_grad_(False)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    with torch.no_grad():  # transformers installs its own output-capturing hooks on first use
        forward_with_hidden_states(teacher, **_batch(tiny_tokenizer, TEXTS), layers=[1])
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in teacher.modules()]
    scores = collect_pruning_scores(teacher, [_batch(tiny_tokenizer, TEXTS)], _lm_loss)
    shapes = {"residual": (4, 64), "mlp": (4, 128), "attention": (4, 2), "block_change": (4,)}
    for key, shape in shapes.items():
        assert scores[key].shape == shape, key
        assert torch.isfinite(scores[key]).all() and (scores[key] >= 0).all() and (scores[key] > 0).any(), key
    assert scores["examples"].item() == 3
    assert scores["tokens"].item() == _batch(tiny_tokenizer, TEXTS)["attention_mask"].sum()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in teacher.modules()] == hooks_before


def test_padding_contributes_nothing_and_shards_merge_to_the_whole(build_tiny_llama, tiny_tokenizer):
    """A padded batch scores exactly like its rows one at a time (no padding), and the merged
    per-row states equal the batch's: the block change would count padded positions otherwise."""
    teacher = build_tiny_llama().requires_grad_(False)
    together = collect_pruning_scores(teacher, [_batch(tiny_tokenizer, TEXTS)], _lm_loss)
    rows = [collect_pruning_scores(teacher, [_batch(tiny_tokenizer, [text])], _lm_loss) for text in TEXTS]
    merged = merge_pruning_scores(rows)
    for key in ("residual", "mlp", "attention", "block_change", "examples", "tokens"):
        torch.testing.assert_close(together[key], merged[key], rtol=1e-4, atol=1e-5, msg=key)


def test_backward_and_autograd_grad_give_the_same_scores(build_tiny_llama, tiny_tokenizer):
    teacher = build_tiny_llama().requires_grad_(False)
    batch = _batch(tiny_tokenizer, TEXTS)
    via_grad = collect_pruning_scores(teacher, [batch], _lm_loss)
    with PruningScoreCollector(teacher) as collector:
        logits, _ = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], [])
        _lm_loss(logits, batch).backward()
        collector.accumulate(batch["attention_mask"])
    for key, value in collector.state().items():
        torch.testing.assert_close(value, via_grad[key], msg=key)


def test_collector_says_when_no_gradient_reached_it(build_tiny_llama, tiny_tokenizer):
    teacher = build_tiny_llama().requires_grad_(False)
    batch = _batch(tiny_tokenizer, TEXTS)
    with PruningScoreCollector(teacher) as collector:
        logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], [4])
        torch.autograd.grad(_lm_loss(logits, batch), [hidden[4]])  # the block internals are not asked for
        with pytest.raises(RuntimeError, match="list collector.activations"):
            collector.accumulate(batch["attention_mask"])


# --- choosing what to keep -------------------------------------------------------------------


def test_uniform_layers_spread_from_first_to_last_block():
    assert kept_layer_indices(4, 3) == [0, 2, 3]
    assert kept_layer_indices(6, 4) == [0, 2, 3, 5]
    assert kept_layer_indices(5, 5) == [0, 1, 2, 3, 4]
    assert kept_layer_indices(7, 1) == [6]
    spread = kept_layer_indices(30, 20)
    assert spread[0] == 0 and spread[-1] == 29 and spread == sorted(set(spread)) and len(spread) == 20


def test_importance_layers_keep_the_last_block_and_the_largest_changes():
    change = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3, 0.01])
    assert kept_layer_indices(6, 4, "importance", change) == [0, 2, 4, 5]
    assert kept_layer_indices(6, 1, "importance", change) == [5]
    with pytest.raises(ValueError, match="'importance' needs 'block_change' scores for all 6"):
        kept_layer_indices(6, 4, "importance", None)


def test_perplexity_layers_keep_the_last_block_and_those_whose_skipping_costs_most():
    loss_when_skipped = torch.tensor([9.0, 2.0, 1.5, 4.0, 1.0, 3.0])
    assert kept_layer_indices(6, 4, "perplexity", loss_when_skipped) == [0, 1, 3, 5]
    with pytest.raises(ValueError, match="'perplexity' needs 'skip_loss' scores for all 6"):
        kept_layer_indices(6, 4, "perplexity", torch.ones(5))


def test_student_layer_map_pairs_each_block_with_its_source():
    assert pruned_student_layer_map([0, 2, 3, 5]) == [(1, 1), (3, 2), (4, 3), (6, 4)]


def test_hidden_units_are_ordered_and_no_layer_dominates_by_scale():
    small = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # favours unit 4
    huge = 1e6 * torch.tensor([5.0, 3.0, 0.0, 0.0, 2.0])  # favours unit 0, at a far larger scale
    units = hidden_units_by_importance({1: small, 2: huge}, 5)
    # Normalized sum: [.5, .4, .2, .3, .6]; the raw sum would follow the huge layer: [0, 1, 4, 3, 2].
    assert units.tolist() == [4, 0, 1, 3, 2]
    assert torch.equal(hidden_units_by_importance({1: small, 2: huge}, 3), units[:3])
    with pytest.raises(ValueError, match="layer 2 must be finite, non-negative and not all zero"):
        hidden_units_by_importance({1: small, 2: torch.zeros(5)}, 3)


# --- pruning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_half_width_two_thirds_depth_student_loads_with_from_pretrained(
    family, teacher_and_scores, tiny_tokenizer, tmp_path: Path
):
    teacher, scores = teacher_and_scores(family)
    units = hidden_units_by_importance(dict(enumerate(scores["residual"])), 32)
    for selection in ("uniform", "importance"):
        student = prune_llama(teacher, units, PruneTargets(32, 4, 64, 1, selection), scores)
        student.save_pretrained(tmp_path / selection)
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / selection, output_loading_info=True)
        assert not any(info.values()), info
        assert type(reloaded) is type(teacher)
        config = reloaded.config
        assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 4, 64)
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
        tied = reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
        assert tied == bool(FAMILIES[family].get("tie_word_embeddings"))
        batch = _batch(tiny_tokenizer, TEXTS)
        with torch.no_grad():
            logits = reloaded(**batch).logits
        assert torch.isfinite(logits).all()
        with torch.no_grad():
            assert torch.equal(logits, student(**batch).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_reproduces_the_teacher_exactly(family, teacher_and_scores, tiny_tokenizer):
    teacher, scores = teacher_and_scores(family)
    student = prune_llama(
        teacher, torch.arange(64), PruneTargets.from_model_config(teacher.config, "importance"), scores
    )
    batch = _batch(tiny_tokenizer, TEXTS)
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, teacher(**batch).logits)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_loss_with_a_block_skipped_is_the_loss_of_the_student_cut_without_it(
    family, teacher_and_scores, tiny_tokenizer
):
    """What layer_selection 'perplexity' ranks blocks by is exactly what dropping them costs."""
    teacher, scores = teacher_and_scores(family)
    hooks = [(len(block._forward_hooks), len(block._forward_pre_hooks)) for block in teacher.model.layers]
    batch = _batch(tiny_tokenizer, TEXTS)
    loss_when_skipped = skipped_block_loss_sums(teacher, batch, _lm_loss)
    five_blocks = replace(PruneTargets.from_model_config(teacher.config, "perplexity"), num_layers=5)
    for block in range(5):  # the last block is always kept
        ranking = torch.ones(6)
        ranking[block] = 0.0
        student = prune_llama(teacher, torch.arange(64), five_blocks, scores | {"skip_loss": ranking})
        with torch.no_grad():
            cut = _lm_loss(student(**batch, use_cache=False).logits, batch).double()
        torch.testing.assert_close(loss_when_skipped[block], cut, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        whole = _lm_loss(teacher(**batch).logits, batch).double()
        with skipped_block(teacher, 5):
            assert not torch.isclose(_lm_loss(teacher(**batch).logits, batch).double(), whole)
        # Leaving the context removes the hooks: the teacher is whole again.
        torch.testing.assert_close(_lm_loss(teacher(**batch).logits, batch).double(), whole, rtol=0, atol=0)
    assert [(len(block._forward_hooks), len(block._forward_pre_hooks)) for block in teacher.model.layers] == hooks
    with pytest.raises(ValueError, match="block 6 is not one of the model's 6 blocks"), skipped_block(teacher, 6):
        pass


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen3"])
def test_keeping_every_unit_in_any_order_reproduces_the_teacher(family, teacher_and_scores, tiny_tokenizer):
    """RMSNorm is permutation-equivariant, so a permuted full keep is the same function: this
    fails if any weight is sliced along the wrong axis or in the wrong order."""
    teacher, _ = teacher_and_scores(family)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    student = prune_llama(teacher, order, PruneTargets.from_model_config(teacher.config))
    batch = _batch(tiny_tokenizer, TEXTS)
    with torch.no_grad():
        student_logits, student_hidden = forward_with_hidden_states(student, **batch, layers=[3, 6])
        teacher_logits, teacher_hidden = forward_with_hidden_states(teacher, **batch, layers=[3, 6])
    torch.testing.assert_close(student_logits, teacher_logits, atol=1e-5, rtol=1e-5)
    for layer in (3, 6):  # student unit i is teacher unit order[i]
        torch.testing.assert_close(student_hidden[layer], teacher_hidden[layer][..., order], atol=1e-5, rtol=1e-5)


def test_pruned_student_keeps_the_pairing_and_the_important_parts(teacher_and_scores, tiny_tokenizer):
    teacher, scores = teacher_and_scores("llama")
    scores = dict(scores)
    scores["mlp"] = torch.zeros(6, 128)
    scores["mlp"][:, 64:] = 1.0  # only the second half of the channels matters
    scores["attention"] = torch.tensor([[0.0, 1.0]]).repeat(6, 1)  # only KV group 1 matters
    units = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:32]
    student = prune_llama(teacher, units, PruneTargets(32, 4, 64, 1), scores)
    batch = _batch(tiny_tokenizer, TEXTS)
    with torch.no_grad():  # the embedding output is not normed: unit i is exactly teacher unit units[i]
        _, student_hidden = forward_with_hidden_states(student, **batch, layers=[0])
        _, teacher_hidden = forward_with_hidden_states(teacher, **batch, layers=[0])
    assert torch.equal(student_hidden[0], teacher_hidden[0][..., units])
    source, target = teacher.model.layers[2], student.model.layers[1]  # uniform 6 -> 4 keeps [0, 2, 3, 5]
    assert torch.equal(target.mlp.gate_proj.weight, source.mlp.gate_proj.weight[64:][:, units])
    assert torch.equal(target.mlp.down_proj.weight, source.mlp.down_proj.weight[units][:, 64:])
    # KV group 1 = KV head 1 (rows 16..31 of k/v) and query heads 2, 3 (rows 32..63 of q).
    assert torch.equal(target.self_attn.k_proj.weight, source.self_attn.k_proj.weight[16:32][:, units])
    assert torch.equal(target.self_attn.q_proj.weight, source.self_attn.q_proj.weight[32:64][:, units])
    assert torch.equal(target.self_attn.o_proj.weight, source.self_attn.o_proj.weight[units][:, 32:64])
    assert torch.equal(target.input_layernorm.weight, source.input_layernorm.weight[units])


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (PruneTargets(65, 3, 64, 1), r"^student\.architecture\.hidden_size = 65 exceeds the teacher's 64$"),
        (PruneTargets(32, 5, 64, 1), r"^student\.architecture\.num_hidden_layers = 5 exceeds the teacher's 4$"),
        (PruneTargets(32, 3, 256, 1), r"^student\.architecture\.intermediate_size = 256 exceeds the teacher's 128$"),
        (PruneTargets(32, 3, 64, 3), r"^student\.architecture\.num_key_value_heads = 3 exceeds the teacher's 2$"),
        (
            PruneTargets(32, 3, 64, 1, num_attention_heads=4),
            r"^student\.architecture\.num_attention_heads = 4 must be ",
        ),
        (
            PruneTargets(30, 3, 64, 2),
            r"^student\.architecture\.hidden_size = 30 is not a multiple of the 4 attention heads",
        ),
    ],
)
def test_shapes_the_teacher_cannot_be_cut_to_are_refused_in_one_line(targets, message, build_tiny_llama):
    teacher = build_tiny_llama()
    with pytest.raises(ValueError, match=message) as error:
        prune_llama(teacher, torch.arange(targets.hidden_size), targets)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": 0}, r"^student\.architecture\.hidden_size = 0 must be a positive integer$"),
        (
            {"num_key_value_heads": 4, "num_attention_heads": 6},
            r"^student\.architecture\.num_key_value_heads = 4 does not divide num_attention_heads = 6$",
        ),
        ({"layer_selection": "random"}, r"^student\.layer_selection = 'random' is not one of"),
    ],
)
def test_invalid_targets_are_refused_on_construction(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        PruneTargets(
            **{"hidden_size": 32, "num_layers": 3, "intermediate_size": 64, "num_key_value_heads": 2, **fields}
        )
    assert "\n" not in str(error.value)


def test_unsupported_architecture_and_bad_inputs_are_refused_in_one_line(build_tiny_llama):
    with pytest.raises(
        ValueError,
        match=r"^pruning supports llama-family models \(llama, mistral, qwen2, qwen3\); "
        r"got 'gpt2'$",
    ):
        PruneTargets(32, 3, 64, 1).validate_for(AutoConfig.for_model("gpt2"))
    teacher = build_tiny_llama()
    with pytest.raises(ValueError, match=r"^student\.architecture\.intermediate_size = 64 needs 'mlp' pruning scores"):
        prune_llama(teacher, torch.arange(32), PruneTargets(32, 3, 64, 2))
    with pytest.raises(ValueError, match=r"^hidden_units must be 32 distinct teacher units in 0\.\.63$"):
        prune_llama(teacher, torch.zeros(32, dtype=torch.long), PruneTargets(32, 3, 128, 2))
    with pytest.raises(
        ValueError, match=r"^hidden_units has shape \(16,\); student\.architecture\.hidden_size = 32 needs"
    ):
        prune_llama(teacher, torch.arange(16), PruneTargets(32, 3, 128, 2))


# --- the real teacher -------------------------------------------------------------------------

# Measured on 32 held-out SST-2 sentences (prune to 384 wide, 20 blocks, MLP 1024, 2 KV groups,
# block-change layer choice, residual units by summed per-block Taylor importance): 0.160;
# the same with the units chosen by the last layer's |grad| (the Flex-KD artifact): 0.018;
# a shuffled pairing: about 0.
MIN_PAIRED_CORRELATION = 0.10


def _sst2_batch(tokenizer, path: Path, rows: int) -> dict[str, torch.Tensor]:
    task = TaskConfig(
        kind="classification",
        prompt_template="Review: {sentence}\nSentiment:",
        label_names=["negative", "positive"],
    )
    with path.open(newline="") as handle:
        records = list(islice(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), rows))
    columns = {"sentence": [r["sentence"].strip() for r in records], "label": [int(r["label"]) for r in records]}
    return collate_batch(tokenize_rows(columns, tokenizer, task, 128), tokenizer.pad_token_id)


def _t0_perplexity(model, tokenizer, path: Path, rows: int = 32) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines()[-rows:]]
    task = TaskConfig(kind="generation", prompt_template="{prompt}", response_column="completion")
    columns = {"prompt": [r["prompt"] for r in records], "completion": [r["completion"] for r in records]}
    batch = collate_batch(tokenize_rows(columns, tokenizer, task, 256), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.exp(causal_lm_loss(logits, batch["labels"])))


@pytest.mark.slow
def test_pruned_smollm2_correlates_with_the_teacher_at_paired_units(shared_data: Path):
    started = time.perf_counter()
    folder = fetch_demo_teacher()
    teacher, tokenizer = load_model(folder).requires_grad_(False), load_tokenizer(folder)
    verbalizers = torch.tensor(verbalizer_token_ids(tokenizer, ["negative", "positive"]))
    scoring = _sst2_batch(tokenizer, shared_data / "sst2" / "train.tsv", 32)
    held_out = _sst2_batch(tokenizer, shared_data / "sst2" / "dev.tsv", 32)
    last = teacher.config.num_hidden_layers

    # As the score stage would: one backward gives the Flex-KD importance and the pruning scores.
    last_layer_importance = torch.zeros(teacher.config.hidden_size)
    with PruningScoreCollector(teacher) as collector:
        for start in range(0, 32, 8):
            batch = {key: value[start : start + 8] for key, value in scoring.items()}
            logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], [last])
            loss = summed_task_loss("classification", logits, batch, verbalizers)
            gradients = torch.autograd.grad(loss, [hidden[last]] + collector.activations())
            last_layer_importance += unit_importance_sum(gradients[0], hidden[last], batch["attention_mask"])
            collector.accumulate(batch["attention_mask"])
    scores = collector.state()

    with torch.no_grad():
        _, teacher_hidden = forward_with_hidden_states(
            teacher, held_out["input_ids"], held_out["attention_mask"], [last]
        )
    targets = PruneTargets(384, 20, 1024, 2, layer_selection="importance")

    def paired_correlation(units: torch.Tensor) -> tuple[float, float, torch.nn.Module]:
        student = prune_llama(teacher, units, targets, scores)
        with torch.no_grad():
            _, student_hidden = forward_with_hidden_states(
                student, held_out["input_ids"], held_out["attention_mask"], [20]
            )
        teacher_units = teacher_hidden[last][..., units]
        shuffled = teacher_units[..., torch.randperm(384, generator=torch.Generator().manual_seed(0))]
        paired = 1 - correlation_loss(student_hidden[20], teacher_units, held_out["attention_mask"]).item()
        unpaired = 1 - correlation_loss(student_hidden[20], shuffled, held_out["attention_mask"]).item()
        return paired, unpaired, student

    units = hidden_units_by_importance(dict(enumerate(scores["residual"])), 384)
    paired, unpaired, student = paired_correlation(units)
    flexkd_paired, _, _ = paired_correlation(hidden_units_by_importance({last: last_layer_importance}, 384))
    teacher_ppl = _t0_perplexity(teacher, tokenizer, shared_data / "t0_mix" / "train.jsonl")
    student_ppl = _t0_perplexity(student, tokenizer, shared_data / "t0_mix" / "train.jsonl")
    print(
        f"paired correlation {paired:.3f} (shuffled pairing {unpaired:.3f}, last-layer |grad| units "
        f"{flexkd_paired:.3f}); t0_mix perplexity teacher {teacher_ppl:.1f}, untrained student {student_ppl:.4g}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    assert paired > MIN_PAIRED_CORRELATION
    assert paired > unpaired + 0.08
    assert paired > flexkd_paired + 0.05
    assert torch.isfinite(torch.tensor([teacher_ppl, student_ppl])).all()
