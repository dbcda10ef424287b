"""Shared fixtures: the shipped tiny tokenizer, tiny random Llama models, the shared data sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexkd import console
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"

# 2 KV heads under 4 query heads so grouped-query attention is exercised, as in SmolLM2.
TINY_LLAMA_ARCHITECTURE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}


@pytest.fixture(autouse=True)
def loud_console(monkeypatch):
    """Each test starts like a process that flexkd.console.quiet() has not run in: a test calling
    cli.main without --verbose would otherwise leave it on for the tests after it. (pytest
    restores the warning filters itself.)"""
    monkeypatch.setattr(console, "_quiet", False)
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data sets (repo_root/../shared/data); skips the test where they are absent."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def local_ray():
    """One real local Ray for the whole session: starting Ray costs ~10 s on 2 cores.

    Bound to 127.0.0.1 with no dashboard. Workers get the repo and tests/ on their path, since
    test-defined train loops are pickled by reference to their test module.
    """
    import os

    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="ERROR",
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped 512-token byte-level BPE (fresh per test, so tests may modify it)."""
    return load_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture
def tiny_llama_architecture() -> dict[str, Any]:
    return dict(TINY_LLAMA_ARCHITECTURE)


@pytest.fixture
def build_tiny_llama(tiny_tokenizer: PreTrainedTokenizerBase) -> Callable[..., PreTrainedModel]:
    """Factory for tiny random Llama models that fit the tiny tokenizer.

    Call as `build_tiny_llama(kind="causal_lm", seed=0, num_labels=None, **architecture_overrides)`.
    """

    def build(
        kind: str = "causal_lm", seed: int = 0, num_labels: int | None = None, **overrides: Any
    ) -> PreTrainedModel:
        return build_random_model(
            {**TINY_LLAMA_ARCHITECTURE, **overrides},
            vocab_size=len(tiny_tokenizer),
            seed=seed,
            kind=kind,
            pad_token_id=tiny_tokenizer.pad_token_id,
            bos_token_id=tiny_tokenizer.bos_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id,
            num_labels=num_labels,
        )

    return build
