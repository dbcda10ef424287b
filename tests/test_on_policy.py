"""On-policy distillation (flexkd.method.on_policy): which steps sample, the batch the student's
samples make, the config it needs, and sampling by a student sharded over two gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_two_ranks
from test_generate import generation_debug
from transformers import LlamaConfig, LlamaForCausalLM

from flexkd import distributed as fd
from flexkd.config.schema import ConfigError, as_hashed, load_config
from flexkd.method.on_policy import is_on_policy_step, sample_on_policy_batch

REPO = Path(__file__).resolve().parent.parent
PAD, EOS = 0, 1


def _student(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows: prompts of 3 and 5 tokens, then data responses the samples replace."""
    input_ids = torch.tensor([[5, 6, 7, 40, 41, EOS, PAD], [8, 9, 10, 11, 12, 42, EOS]])
    labels = torch.tensor([[-100, -100, -100, 40, 41, EOS, -100], [-100] * 5 + [42, EOS]])
    return {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(7) < torch.tensor([[6], [7]])).long(),
        "labels": labels,
        "prompt_length": torch.tensor([3, 5]),
        "class_label": torch.tensor([-1, -1]),
        "example_id": torch.tensor([17, 4]),
    }


def test_the_share_of_on_policy_steps_is_the_fraction_and_the_same_on_a_rerun():
    chosen = [is_on_policy_step(3, step, 0.25) for step in range(2000)]
    assert 0.22 < sum(chosen) / len(chosen) < 0.28
    assert chosen == [is_on_policy_step(3, step, 0.25) for step in range(2000)]  # a restarted run agrees
    assert chosen != [is_on_policy_step(4, step, 0.25) for step in range(2000)]
    assert not any(is_on_policy_step(3, step, 0.0) for step in range(100))
    assert all(is_on_policy_step(3, step, 1.0) for step in range(100))


# SmolLM2's tokenizer pads with its eos: a response still ends at its first eos.
@pytest.mark.parametrize("pad", [PAD, EOS], ids=["pad-apart-from-eos", "pad-is-eos"])
def test_the_students_samples_replace_the_responses_after_the_same_prompts(pad):
    batch, student = _batch(), _student()
    state = torch.get_rng_state()
    sampled = sample_on_policy_batch(student, batch, 32, 6, 1.0, pad, EOS, seed=0)

    assert torch.equal(sampled["prompt_length"], batch["prompt_length"])
    assert torch.equal(sampled["example_id"], batch["example_id"]) and sampled["class_label"].tolist() == [-1, -1]
    for row, prompt in enumerate(([5, 6, 7], [8, 9, 10, 11, 12])):
        length = int(sampled["attention_mask"][row].sum())
        ids, labels = sampled["input_ids"][row, :length].tolist(), sampled["labels"][row].tolist()
        response = ids[len(prompt) :]
        assert ids[: len(prompt)] == prompt
        assert 1 <= len(response) <= 6 and (EOS not in response[:-1])  # ends at its first eos, or is cut at 6
        # Targets: the response (with its eos), nothing on the prompt or the padding.
        assert labels[: len(prompt)] == [-100] * len(prompt) and labels[len(prompt) : length] == response
        assert set(labels[length:]) <= {-100} and set(sampled["input_ids"][row, length:].tolist()) <= {pad}
    assert torch.equal(torch.get_rng_state(), state)  # the training's own random state is untouched
    # Seeded: the same samples again, other ones with another seed.
    assert torch.equal(
        sample_on_policy_batch(_student(), batch, 32, 6, 1.0, pad, EOS, seed=0)["input_ids"], sampled["input_ids"]
    )
    others = [sample_on_policy_batch(_student(), batch, 32, 6, 1.0, pad, EOS, seed=s)["input_ids"] for s in (1, 2, 3)]
    assert any(
        other.shape != sampled["input_ids"].shape or not torch.equal(other, sampled["input_ids"]) for other in others
    )


def test_a_prompt_is_cut_from_the_left_so_the_row_fits_max_length():
    sampled = sample_on_policy_batch(_student(), _batch(), 9, 6, 1.0, PAD, EOS, seed=0)
    assert sampled["prompt_length"].tolist() == [3, 3]  # 9 - 6 tokens of each prompt: its end
    assert sampled["input_ids"][1, :3].tolist() == [10, 11, 12] and sampled["input_ids"].shape[1] <= 9


def test_a_response_that_ends_keeps_its_eos_as_the_last_target():
    student = _student()
    student.lm_head = torch.nn.Linear(32, 64)  # a head whose every choice is eos
    with torch.no_grad():
        student.lm_head.weight.zero_()
        student.lm_head.bias.zero_()
        student.lm_head.bias[EOS] = 30.0
    sampled = sample_on_policy_batch(student, _batch(), 32, 6, 1.0, PAD, EOS, seed=0)
    assert sampled["labels"].tolist() == [[-100, -100, -100, EOS, -100, -100], [-100] * 5 + [EOS]]
    assert sampled["attention_mask"].sum(dim=1).tolist() == [4, 6]


def test_on_policy_needs_generation_and_an_online_teacher(tmp_path):
    def config(**training):
        return generation_debug(
            tmp_path,
            generate=None,
            **{"training.on_policy": 0.5, "training.on_policy_max_new_tokens": 8}
            | {f"training.{k}": v for k, v in training.items()},
        )

    assert config().training.on_policy == 0.5
    with pytest.raises(ConfigError, match=r": training.on_policy needs training.teacher 'online': a cache holds"):
        config(teacher="cache")
    with pytest.raises(ConfigError, match=r": training.on_policy needs task.kind 'generation', not 'classification'$"):
        load_config(REPO / "pipelines" / "debug.yaml", {"training.on_policy": 0.5})
    with pytest.raises(ConfigError, match=r"training.on_policy: Input should be less than or equal to 1$"):
        config(on_policy=1.5)
    with pytest.raises(ConfigError, match=r"on_policy_max_new_tokens = 64 leaves a prompt less than half of data"):
        generation_debug(tmp_path, generate=None, **{"training.on_policy": 0.5, "data.max_length": 96})
    with pytest.raises(ConfigError, match=r"training.on_policy needs a teacher loss"):
        generation_debug(
            tmp_path,
            generate=None,
            **{"training.on_policy": 0.5, "training.on_policy_max_new_tokens": 8, "loss.beta": 0.0, "loss.gamma": 0.0},
        )


def test_on_policy_off_leaves_every_fingerprint_as_it_was_before_the_setting_existed(tmp_path):
    from flexkd.pipeline.runner import fingerprinted_config, planned_fingerprint

    def config(**training):
        training = {"on_policy_max_new_tokens": 8} | training
        return generation_debug(tmp_path, generate=None, **{f"training.{k}": v for k, v in training.items()})

    off = config()
    assert not {"on_policy", "on_policy_max_new_tokens", "on_policy_temperature"} & set(
        fingerprinted_config(off, "distill")["training"]
    )
    assert planned_fingerprint(config(on_policy_max_new_tokens=9), "distill") == planned_fingerprint(off, "distill")
    assert config(on_policy_max_new_tokens=9).fingerprint() == off.fingerprint()
    on = config(on_policy=0.5)
    assert fingerprinted_config(on, "distill")["training"]["on_policy"] == 0.5
    assert planned_fingerprint(on, "distill") != planned_fingerprint(off, "distill")
    hotter = config(on_policy=0.5, on_policy_temperature=0.7)
    assert planned_fingerprint(hotter, "distill") != planned_fingerprint(on, "distill")
    # The whole config's hash too (it names submitted jobs and sweeps): as before the setting existed.
    hashed = as_hashed(off.model_dump(mode="json"), off)["training"]
    assert not {"on_policy", "on_policy_max_new_tokens", "on_policy_temperature"} & set(hashed)
    assert off.fingerprint() != on.fingerprint()


def _sample_sharded(out: str) -> None:
    from flexkd.method.objective import ObjectiveSettings, objective_module

    student = _student()
    settings = ObjectiveSettings("generation", 1.0, 1.0, 0.0, 2.0, "forward_kl", 0.5, 0.1, None, 32)
    module = fd.shard_model(objective_module(student, settings, [], None, 32), trainable=True)
    rows = {key: value[fd.rank() : fd.rank() + 1] for key, value in _batch().items()}
    # Before the root's first forward (step 0 may sample) and with the ranks' lengths apart.
    with torch.no_grad():
        sampled = module(
            rows,
            None,
            {},
            with_student=lambda s: sample_on_policy_batch(s, rows, 32, 6, 1.0, PAD, EOS, seed=fd.rank(), synced=True),
        )
    parts = module(sampled, None, {}, on_policy=True)  # and the training step after it still works
    parts["total"].backward()
    torch.save(sampled, Path(out) / f"rank{fd.rank()}.pt")


def test_a_student_sharded_over_two_ranks_samples_what_it_samples_whole(tmp_path):
    run_on_two_ranks(_sample_sharded, str(tmp_path))
    whole = _student()
    for rank in (0, 1):
        rows = {key: value[rank : rank + 1] for key, value in _batch().items()}
        expected = sample_on_policy_batch(whole, rows, 32, 6, 1.0, PAD, EOS, seed=rank)
        sharded = torch.load(tmp_path / f"rank{rank}.pt")
        length = int(expected["attention_mask"].sum())
        assert sharded["input_ids"][0, :length].tolist() == expected["input_ids"][0, :length].tolist(), rank


@pytest.mark.integration  # one more debug pipeline, every step on the student's own samples: 1-2 min
def test_every_step_on_policy_trains_on_the_students_samples_without_the_task_loss(tmp_path, local_ray):
    from flexkd.pipeline.runner import run_pipeline

    overrides = {"training.on_policy": 1.0, "training.on_policy_max_new_tokens": 8}
    config = generation_debug(tmp_path, generate=None, **overrides)
    result = run_pipeline(config, stages=("tokenize", "score", "distill"))
    metrics = json.loads((result.stages["distill"].directory / "metrics.json").read_text())
    assert metrics["on_policy_steps"] == config.training.steps == 4
    # The last step's parts: the task loss is computed on the samples, and left out of the total.
    assert metrics["task"] > 0
    expected = config.loss.beta * metrics["logit"] + config.loss.gamma * metrics["feature"]
    assert metrics["total"] == pytest.approx(expected, rel=1e-5)
