"""The teacher-target cache gives the loss, and the training, of the online teacher.

Stated tolerances (what the cache format implies):

- classification logit part: exact (class logits stored in float32): 1e-6;
- feature part (k <= k_max, units stored in float16): the correlation of fp16-rounded features,
  |delta| <= 2e-3 absolute on a loss in [0, 2];
- generation logit part: the cache compares K + 1 bins (top-K and "the rest"). By the chain rule
  of KL, full forward KL = top-K KL + tau^2 * mean(P_rest * KL(teacher tail || student tail)): the
  error top-K truncation implies, asserted as an identity to 1e-5. At a temperature whose
  normalizer the cache stores (targets.temperatures, default 1 and 2) the cached loss is the
  exact top-K loss (1e-5); at another, the normalizer is approximated from the nearest stored
  one (uniform tail, flexkd.objective.cached_topk_logprobs), asserted to add less error than
  the truncation itself (measured here at tau = 3 from 2: 1.76 against 2.67, on a loss of 11.2);
- a cached and an online distill run of 12 steps end at the same parameters: max |delta| 2e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flexkd.config.schema import LossConfig, TaskConfig, apply_overrides, load_config, parse_config
from flexkd.data.rows import ROW_SCHEMA, collate_batch, tokenize_rows, verbalizer_token_ids
from flexkd.data.teacher_targets import cached_teacher_outputs, online_teacher_outputs, target_columns, units_column
from flexkd.method.layers import forward_with_hidden_states
from flexkd.method.losses import teacher_topk, topk_logit_distillation_loss
from flexkd.method.objective import (
    LayerPair,
    cached_topk_logprobs,
    class_logits,
    distillation_loss,
    forward_scored,
)
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer
from flexkd.models.plan import build_student, count_teacher_loads
from flexkd.pipeline.runner import run_pipeline
from flexkd.stages.targets import _cache_schema

SAMPLES = TINY_TOKENIZER_DIR.parent / "samples"
PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
ARCH = {"num_attention_heads": 4, "num_key_value_heads": 2}
K_MAX, TOP_K = 24, 32


def _models(tokenizer):
    teacher = (
        build_random_model(
            {**ARCH, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128},
            vocab_size=len(tokenizer),
            seed=0,
        )
        .eval()
        .requires_grad_(False)
    )
    teacher.lm_head.weight.mul_(30.0)  # peaked, as a trained teacher is: the top 32 tokens hold most of the mass
    student = build_random_model(
        {**ARCH, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}, vocab_size=len(tokenizer), seed=1
    )
    return teacher, student


def _batch(kind: str, tokenizer):
    if kind == "classification":
        task = TaskConfig(
            kind=kind, prompt_template="Review: {sentence}\nSentiment:", label_names=["negative", "positive"]
        )
        source = SAMPLES / "sst2_train.jsonl"
    else:
        task = TaskConfig(kind=kind, prompt_template="Summarize: {dialogue}\nSummary:", response_column="summary")
        source = SAMPLES / "samsum.jsonl"
    lines = [json.loads(line) for line in source.read_text().splitlines()[:12]]
    rows = tokenize_rows({key: [line[key] for line in lines] for key in lines[0]}, tokenizer, task, max_length=64)
    verbalizers = torch.tensor(verbalizer_token_ids(tokenizer, task.label_names)) if kind == "classification" else None
    return rows, collate_batch(rows, tokenizer.pad_token_id), verbalizers


def _cache_round_trip(tmp_path: Path, kind: str, rows, batch, teacher, layers, order, verbalizers, temperatures=(1.0,)):
    """Write cache rows to parquet and read them back, as the targets stage and distill do."""
    with torch.no_grad():
        logits, hidden = forward_with_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], layers)
    columns = target_columns(logits, hidden, batch, order, kind, verbalizers, TOP_K, temperatures)
    table = pa.Table.from_pydict(
        {name: rows[name] for name in ROW_SCHEMA.names} | columns, schema=_cache_schema(layers, kind)
    )
    pq.write_table(table, tmp_path / "cache.parquet")
    read = pq.read_table(tmp_path / "cache.parquet").to_pydict()
    return {name: [np.asarray(value) for value in values] for name, values in read.items()}


@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("k", [8, K_MAX])
def test_cached_loss_equals_online_loss(tmp_path, kind, k):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    teacher, student = _models(tokenizer)
    rows, batch, verbalizers = _batch(kind, tokenizer)
    pairs = [LayerPair(2, 1), LayerPair(4, 2)]
    layers = [2, 4]
    selected = {layer: torch.randperm(64, generator=torch.Generator().manual_seed(layer))[:K_MAX] for layer in layers}
    settings = LossConfig(temperature=1.0).objective_settings(kind, k)

    online_logits, online_features = online_teacher_outputs(teacher, batch, kind, layers, selected, whole_hidden=False)
    cache_rows = _cache_round_trip(tmp_path, kind, rows, batch, teacher, layers, selected, verbalizers)
    cached_logits, cached_features = cached_teacher_outputs(
        cache_rows, batch, kind, dict.fromkeys(layers, K_MAX), k, None, TOP_K, torch.device("cpu")
    )
    with torch.no_grad():
        student_logits, student_hidden = forward_with_hidden_states(
            student, batch["input_ids"], batch["attention_mask"], [1, 2]
        )
    online = distillation_loss(
        settings, batch, student_logits, student_hidden, online_logits, online_features, pairs, verbalizers
    )
    cached = distillation_loss(
        settings, batch, student_logits, student_hidden, cached_logits, cached_features, pairs, verbalizers
    )

    # The task part is the student's own loss on the labels, the same with any teacher; what the
    # cache stands in for is the teacher's targets, compared here directly. (A shift of every
    # class score would leave the logit loss unchanged and still be a wrong cache.)
    if kind == "classification":
        online_scores = class_logits(online_logits, batch["attention_mask"], verbalizers)
        torch.testing.assert_close(cached_logits.class_scores, online_scores, rtol=0, atol=1e-6)
    else:
        online_top = online_logits.topk(TOP_K, dim=-1)  # [N, V] at the response positions only
        assert torch.equal(cached_logits.topk_ids, online_top.indices)
        torch.testing.assert_close(cached_logits.topk_logits, online_top.values, rtol=0, atol=1e-5)
        torch.testing.assert_close(cached_logits.logsumexp, online_logits.logsumexp(-1), rtol=0, atol=1e-4)
    assert abs(float(cached["feature"]) - float(online["feature"])) <= 2e-3
    for layer in layers:  # the features themselves: the first k selected units, to half precision
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(
            cached_features[layer][valid], online_features[layer][..., :k][valid], rtol=1e-3, atol=1e-3
        )
    if kind == "classification":
        assert abs(float(cached["logit"]) - float(online["logit"])) <= 1e-6
    else:
        student_scores = student_logits[:, :-1][batch["labels"][:, 1:] != -100]
        teacher_scores = online_logits  # the online teacher projects onto the vocabulary at these positions only
        log_probs, ids = teacher_topk(teacher_scores, TOP_K)
        exact_topk = topk_logit_distillation_loss("forward_kl", student_scores, log_probs, ids)
        assert abs(float(cached["logit"]) - float(exact_topk)) <= 1e-5
        truncation = _tail_term(student_scores, teacher_scores, ids, temperature=1.0)
        assert float(truncation) >= 0
        assert abs(float(online["logit"]) - float(exact_topk) - float(truncation)) <= 1e-5


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_logits_at_the_scored_positions_only_give_the_same_loss(kind):
    """forward_scored skips the vocabulary projection where the objective reads no logits."""
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    teacher, student = _models(tokenizer)
    _, batch, verbalizers = _batch(kind, tokenizer)
    settings, pairs = LossConfig().objective_settings(kind, 16), [LayerPair(4, 2)]
    with torch.no_grad():
        full = [
            forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], [layer])
            for model, layer in ((student, 2), (teacher, 4))
        ]
        scored = [forward_scored(model, batch, kind, [layer]) for model, layer in ((student, 2), (teacher, 4))]
    parts = [
        distillation_loss(settings, batch, s_logits, s_hidden, t_logits, {4: t_hidden[4][..., :16]}, pairs, verbalizers)
        for (s_logits, s_hidden), (t_logits, t_hidden) in (full, scored)
    ]
    assert scored[0][0].shape[0] < full[0][0].shape[0] * full[0][0].shape[1]  # fewer positions projected
    for name in ("task", "logit", "feature", "total"):
        assert abs(float(parts[0][name]) - float(parts[1][name])) <= 1e-5, name


def _tail_term(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * mean over positions of P_rest * KL(teacher tail || student tail), renormalized tails."""
    log_t, log_s = F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    tail = torch.ones_like(log_t, dtype=torch.bool).scatter(-1, ids, False)
    rest_t = torch.logsumexp(log_t.masked_fill(~tail, -torch.inf), -1, keepdim=True)
    rest_s = torch.logsumexp(log_s.masked_fill(~tail, -torch.inf), -1, keepdim=True)
    tail_t, tail_s = (log_t - rest_t).masked_fill(~tail, -torch.inf), (log_s - rest_s).masked_fill(~tail, -torch.inf)
    kl = torch.where(tail, tail_t.exp() * (tail_t - tail_s), 0.0).sum(-1)
    return (rest_t.squeeze(-1).exp() * kl).mean() * temperature**2


@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_generation_logit_part_at_other_temperatures(tmp_path, temperature):
    """Exact at a temperature whose normalizer the cache stores (2). At one it does not store (3),
    approximated from the nearest (2): off by less than top-K truncation itself is."""
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    teacher, student = _models(tokenizer)
    rows, batch, _ = _batch("generation", tokenizer)
    cache_rows = _cache_round_trip(
        tmp_path, "generation", rows, batch, teacher, [4], {4: torch.arange(8)}, None, temperatures=(1.0, 2.0)
    )
    cached, _ = cached_teacher_outputs(
        cache_rows,
        batch,
        "generation",
        {4: 8},
        8,
        None,
        TOP_K,
        torch.device("cpu"),
        temperatures=(1.0, 2.0),
        temperature=temperature,
    )
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:] != -100
    student_scores, teacher_scores = student_logits[:, :-1][targets], teacher_logits[:, :-1][targets]
    settings = LossConfig(alpha=0, gamma=0, temperature=temperature).objective_settings("generation", 0)
    from_cache = distillation_loss(settings, batch, student_logits, {}, cached, {}, [])["logit"]
    log_probs, ids = teacher_topk(teacher_scores, TOP_K, temperature=temperature)
    exact_topk = topk_logit_distillation_loss("forward_kl", student_scores, log_probs, ids, temperature=temperature)
    full = distillation_loss(settings, batch, student_logits, {}, teacher_logits, {}, [])["logit"]
    truncation = _tail_term(student_scores, teacher_scores, ids, temperature)
    assert abs(float(full) - float(exact_topk) - float(truncation)) <= 1e-5  # truncation, exactly
    normalizer_error = abs(float(from_cache) - float(exact_topk))  # the approximated normalizer, on top
    print(
        f"tau={temperature}: full {float(full):.4f}, top-K {float(exact_topk):.4f}, cached {float(from_cache):.4f}, "
        f"truncation {float(truncation):.4f}, normalizer error {normalizer_error:.2e}"
    )
    assert normalizer_error <= (1e-5 if temperature == 2.0 else float(truncation))


def test_cached_logprobs_are_exact_when_the_dropped_logits_are_equal():
    logits = torch.cat([torch.tensor([[5.0, 3.0, 2.5, 1.0]]), torch.full((1, 60), -1.0)], dim=-1).double()
    top = torch.topk(logits, 4, dim=-1)
    for tau in (0.5, 1.0, 2.0, 4.0):
        cached = cached_topk_logprobs(top.values, torch.logsumexp(logits, -1), logits.shape[-1], tau)
        torch.testing.assert_close(cached, F.log_softmax(logits / tau, -1)[:, :4], rtol=0, atol=1e-12)


def test_full_width_cache_gives_back_the_whole_hidden_state(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    teacher, _ = _models(tokenizer)
    rows, batch, verbalizers = _batch("classification", tokenizer)
    selected = torch.tensor([7, 3, 50, 11])
    order = torch.cat([selected, torch.tensor([u for u in range(64) if u not in selected.tolist()])])
    cache_rows = _cache_round_trip(tmp_path, "classification", rows, batch, teacher, [4], {4: order}, verbalizers)
    _, features = cached_teacher_outputs(
        cache_rows, batch, "classification", {4: 64}, 4, {4: torch.argsort(order)}, TOP_K, torch.device("cpu")
    )
    _, whole = online_teacher_outputs(teacher, batch, "classification", [4], {}, whole_hidden=True)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(features[4][valid], whole[4][valid], rtol=1e-3, atol=1e-3)


def _debug(root: Path, **overrides):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    return parse_config(
        apply_overrides(
            raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
        )
    )


def _student_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "student" / "model.safetensors")


@pytest.mark.slow  # about 1.5 min of Ray Train runs: `make test-slow`
def test_cached_and_online_runs_reach_the_same_parameters(tmp_path, local_ray):
    online = run_pipeline(_debug(tmp_path), stages=("tokenize", "score", "distill"))
    cache_config = _debug(tmp_path, **{"training.teacher": "cache"})
    prepared = run_pipeline(cache_config, stages=("tokenize", "score", "targets"))
    assert prepared.stages["tokenize"].cached and prepared.stages["score"].cached  # shared with the online run
    loads = count_teacher_loads(cache_config)
    cached = run_pipeline(cache_config, stages=("distill",))
    assert count_teacher_loads(cache_config) == loads  # distill from the cache never loads the teacher
    assert cached.stages["distill"].fingerprint != online.stages["distill"].fingerprint

    first, second = (
        _student_weights(online.stages["distill"].directory),
        _student_weights(cached.stages["distill"].directory),
    )
    start = build_student(cache_config).state_dict()
    moved = max(float((first[name] - start[name]).abs().max()) for name in first if name in start)
    difference = max(float((first[name] - second[name]).abs().max()) for name in first)
    print(
        f"online vs cached after {cache_config.training.steps} steps: max |delta| {difference:.2e}, "
        f"weights moved up to {moved:.2e}"
    )
    assert moved > 0.01  # training did move the weights, so agreeing is not trivial
    assert difference <= 2e-3, f"max |online - cached| = {difference:.2e} (weights moved up to {moved:.2e})"


def test_a_cache_row_whose_length_disagrees_with_the_batch_is_refused():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    rows = {
        units_column(4): [np.zeros(3 * 2, np.float16), np.zeros(3 * 2, np.float16)],  # the second has 2 tokens
        "teacher_class_logits": [np.zeros(2, np.float32)] * 2,
    }
    with pytest.raises(ValueError, match=r"layer 4: rows store \[6, 6\] values.*\[6, 4\]"):
        cached_teacher_outputs(rows, batch, "classification", {4: 2}, 2, None, 0, torch.device("cpu"))
    rows[units_column(4)][1] = np.arange(2 * 2, dtype=np.float16)
    _, features = cached_teacher_outputs(rows, batch, "classification", {4: 2}, 2, None, 0, torch.device("cpu"))
    assert features[4][1].tolist() == [[0.0, 1.0], [2.0, 3.0], [0.0, 0.0]]  # the row's tokens, then padding
