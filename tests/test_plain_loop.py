"""Flex-KD in a plain PyTorch loop, using only the library: no Ray, no MLflow, no stages.

This is also the example the README points to for people who bring their own training loop.
"""

from __future__ import annotations

import json

import torch

from flexkd import (
    correlation_loss,
    finalize_importance,
    hidden_state_gradients,
    select_top_k_units,
    unit_importance_sum,
)
from flexkd.config.schema import LossConfig, TaskConfig
from flexkd.data.rows import collate_batch, tokenize_rows, verbalizer_token_ids
from flexkd.method.layers import forward_with_hidden_states, resolve_layer_map
from flexkd.method.objective import LayerPair, distillation_loss, summed_task_loss
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer

SAMPLE = TINY_TOKENIZER_DIR.parent / "samples" / "sst2_train.jsonl"
ARCH = {"num_attention_heads": 4, "num_key_value_heads": 2}


def _sst2_sample(rows: int):
    """The tiny tokenizer, the verbalizer ids and one batch of the first ``rows`` shipped SST-2 rows."""
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    task = TaskConfig(
        kind="classification", prompt_template="Review: {sentence}\nSentiment:", label_names=["negative", "positive"]
    )
    verbalizers = torch.tensor(verbalizer_token_ids(tokenizer, task.label_names))
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:rows]]
    columns = {key: [line[key] for line in lines] for key in lines[0]}
    data = collate_batch(tokenize_rows(columns, tokenizer, task, max_length=48), tokenizer.pad_token_id)
    return tokenizer, verbalizers, data


def _student(tokenizer):
    return build_random_model(
        {**ARCH, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}, vocab_size=len(tokenizer), seed=1
    )


def test_plain_loop_distills_task_and_selected_subspace():
    tokenizer, verbalizers, data = _sst2_sample(64)

    teacher = (
        build_random_model(
            {**ARCH, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128},
            vocab_size=len(tokenizer),
            seed=0,
        )
        .eval()
        .requires_grad_(False)
    )
    student = _student(tokenizer)
    ((teacher_layer, student_layer),) = resolve_layer_map("last", 4, 2)

    # 1. Score: |dL_task/dh| of the teacher's last hidden state, averaged over examples.
    logits, hidden = forward_with_hidden_states(teacher, data["input_ids"], data["attention_mask"], [teacher_layer])
    loss = summed_task_loss("classification", logits, data, verbalizers)
    (gradient,) = hidden_state_gradients(loss, [hidden[teacher_layer]])
    importance = finalize_importance(
        unit_importance_sum(gradient, hidden[teacher_layer].detach(), data["attention_mask"], "grad"),
        len(data["input_ids"]),
    )
    units = select_top_k_units(importance, k=32)

    with torch.no_grad():
        teacher_logits, teacher_hidden = forward_with_hidden_states(
            teacher, data["input_ids"], data["attention_mask"], [teacher_layer]
        )
    teacher_selected = {teacher_layer: teacher_hidden[teacher_layer][..., units]}
    settings = LossConfig(feature="correlation").objective_settings("classification", 32)
    pairs = [LayerPair(teacher_layer, student_layer)]

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            student_logits, student_hidden = forward_with_hidden_states(
                student, data["input_ids"], data["attention_mask"], [student_layer]
            )
            parts = distillation_loss(
                settings, data, student_logits, student_hidden, teacher_logits, teacher_selected, pairs, verbalizers
            )
            mean_correlation = 1 - correlation_loss(
                student_hidden[student_layer][..., :32], teacher_selected[teacher_layer], data["attention_mask"]
            )
        return float(parts["task"]), float(mean_correlation)

    task_before, correlation_before = measure()

    # 2. Distill: full batch, so the loss we assert on is the loss we optimize.
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(60):
        student_logits, student_hidden = forward_with_hidden_states(
            student, data["input_ids"], data["attention_mask"], [student_layer]
        )
        parts = distillation_loss(
            settings, data, student_logits, student_hidden, teacher_logits, teacher_selected, pairs, verbalizers
        )
        parts["total"].backward()
        optimizer.step()
        optimizer.zero_grad()

    task_after, correlation_after = measure()
    assert task_after < 0.8 * task_before, (task_before, task_after)
    assert correlation_after > correlation_before + 0.2, (correlation_before, correlation_after)


def test_bf16_autocast_runs_the_student_in_bf16_and_the_losses_in_float32():
    """training.precision bf16: the model forward under autocast, the loss on its outputs in float32."""
    from flexkd.distributed import autocast
    from flexkd.method.objective import forward_scored, objective_module

    tokenizer, verbalizers, data = _sst2_sample(16)
    student = _student(tokenizer)
    generator = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(16, 1, len(tokenizer), generator=generator)
    teacher_features = {3: torch.randn(*data["input_ids"].shape, 48, generator=generator)}
    pairs = [LayerPair(3, 2)]
    cpu = torch.device("cpu")
    for feature in ("correlation", "projector"):
        settings = LossConfig(feature=feature).objective_settings("classification", 32)
        module = objective_module(student, settings, pairs, verbalizers, d_teacher=48)
        features = teacher_features if feature == "projector" else {3: teacher_features[3][..., :32]}
        with torch.no_grad(), autocast("bf16", cpu):
            logits, hidden = forward_scored(student, data, "classification", [2])
            parts = module(data, teacher_logits, features)
        assert logits.dtype == torch.bfloat16  # the residual stream, so the hidden states, stay float32
        # The loss of exactly those bf16 outputs, computed outside autocast (in float32).
        expected = distillation_loss(
            settings, data, logits, hidden, teacher_logits, features, pairs, verbalizers, dict(module.feature_modules)
        )
        for name, value in parts.items():
            assert value.dtype == torch.float32, name
            torch.testing.assert_close(
                value, expected[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        with torch.no_grad(), autocast("float32", cpu):
            assert forward_scored(student, data, "classification", [2])[0].dtype == torch.float32
            reference = module(data, teacher_logits, features)
        for name, value in parts.items():  # bf16 is close to float32, not equal
            torch.testing.assert_close(
                value, reference[name], rtol=0.05, atol=0.05, msg=lambda m, name=name: f"{name}: {m}"
            )
