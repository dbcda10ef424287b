"""A feature loss added through the registry alone: the config accepts it, the objective trains
with it, and a cached distill run of the debug pipeline uses it. docs/extending.md walks through
this file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from flexkd.config.schema import ConfigError, LossConfig, TaskConfig, apply_overrides, load_config, parse_config
from flexkd.data.rows import collate_batch, tokenize_rows, verbalizer_token_ids
from flexkd.method.layers import forward_with_hidden_states
from flexkd.method.objective import LayerPair, objective_module
from flexkd.method.registry import FEATURE_LOSSES, FeatureLoss, register_feature_loss
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer
from flexkd.pipeline.runner import run_pipeline

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
SAMPLE = TINY_TOKENIZER_DIR.parent / "samples" / "sst2_train.jsonl"


def l1_feature_loss(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute difference of paired units over the valid tokens: [B, T, k], [B, T, k], [B, T] -> []."""
    valid = mask.bool()
    difference = (student[valid].float() - teacher[valid].float()).abs()
    return difference.sum() / max(difference.numel(), 1)


@pytest.fixture
def l1_loss():
    """``loss.feature: l1`` for the length of one test."""
    loss = register_feature_loss(FeatureLoss("l1", l1_feature_loss))
    yield loss
    del FEATURE_LOSSES[loss.name]


def _debug(root: Path, **overrides):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    return parse_config(
        apply_overrides(
            raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
        )
    )


def test_the_config_accepts_a_feature_loss_once_registered(tmp_path, l1_loss):
    config = _debug(tmp_path, **{"loss.feature": "l1"})
    assert config.loss.feature_loss is l1_loss and not config.loss.reads_whole_hidden


def test_the_config_refuses_a_feature_loss_nobody_registered(tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.feature: 'l1' is not a registered feature loss"):
        _debug(tmp_path, **{"loss.feature": "l1"})


def test_the_objective_trains_the_student_on_a_registered_loss(l1_loss):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    task = TaskConfig(
        kind="classification", prompt_template="Review: {sentence}\nSentiment:", label_names=["negative", "positive"]
    )
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:8]]
    rows = tokenize_rows({key: [line[key] for line in lines] for key in lines[0]}, tokenizer, task, max_length=48)
    batch = collate_batch(rows, tokenizer.pad_token_id)
    verbalizers = torch.tensor(verbalizer_token_ids(tokenizer, task.label_names))
    architecture = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    student = build_random_model({**architecture, "hidden_size": 32, "intermediate_size": 64}, len(tokenizer), seed=1)
    teacher_features = {4: torch.randn(*batch["input_ids"].shape, 16, generator=torch.Generator().manual_seed(0))}
    settings = LossConfig(feature="l1", alpha=0.0, beta=0.0).objective_settings("classification", k=16)
    module = objective_module(student, settings, [LayerPair(4, 2)], verbalizers, d_teacher=64)

    parts = module(batch, None, teacher_features)
    parts["total"].backward()

    _, hidden = forward_with_hidden_states(student, batch["input_ids"], batch["attention_mask"], [2])
    expected = l1_feature_loss(hidden[2][..., :16], teacher_features[4], batch["attention_mask"])
    torch.testing.assert_close(parts["feature"], expected)
    assert parts["total"] == parts["feature"] and module.extra_trainable_parameters == 0
    gradients = [parameter.grad for parameter in student.model.layers[0].parameters()]
    assert all(gradient is not None for gradient in gradients) and any(g.abs().sum() > 0 for g in gradients)


@pytest.mark.parametrize("name", ["projector", "projector_std"])
def test_both_projectors_train_one_linear_map_per_layer_pair_and_count_it(name):
    student = build_random_model(
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}, 64, seed=0
    )
    settings = LossConfig(feature=name).objective_settings("classification", k=32)
    module = objective_module(student, settings, [LayerPair(2, 1), LayerPair(4, 2)], None, d_teacher=48)
    assert FEATURE_LOSSES[name].whole_hidden and set(module.feature_modules) == {"2-1", "4-2"}
    assert module.extra_trainable_parameters == 2 * (32 * 48 + 48)


@pytest.mark.integration  # the debug pipeline's tokenize, score, targets and distill on local Ray, 2-3 min
def test_a_cached_distill_run_trains_on_a_registered_loss(tmp_path, local_ray, l1_loss):
    config = _debug(tmp_path, **{"training.teacher": "cache", "loss.feature": "l1"})
    result = run_pipeline(config, stages=("tokenize", "score", "targets", "distill"))
    metrics = json.loads((result.stages["distill"].directory / "metrics.json").read_text())
    assert metrics["steps"] == config.training.steps and metrics["extra_trainable_parameters"] == 0
    assert 0 < metrics["feature"] < float("inf")
