"""Large-teacher loading and the student's precision on two real gloo ranks (CPU tensors): the
teacher is built on the meta device, sharded, and filled shard by shard (safetensors) or from
rank 0 (a random teacher), in teacher.dtype; activation checkpointing recomputes without changing
a gradient; a bf16 student computes in bf16 and reduces and keeps its weights in float32.

All two-rank checks share one spawn: starting two processes that import torch and transformers
dominates the runtime on a 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_ranks import run_on_two_ranks
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

from flexkd import distributed as fd
from flexkd.config.schema import PipelineConfig, parse_config
from flexkd.method.importance import hidden_state_gradients
from flexkd.method.layers import forward_with_hidden_states
from flexkd.models.loading import (
    TINY_TOKENIZER_DIR,
    build_on_meta,
    build_random_model,
    load_tokenizer,
    random_model_config,
)
from flexkd.models.plan import load_sharded_teacher, load_teacher

ARCHITECTURE = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,  # as in SmolLM2: lm_head is not in the files, it is embed_tokens
}
LAYERS = [1, 2, 3]


def _config(root: Path, teacher: dict, **sections) -> PipelineConfig:
    return parse_config(
        {
            "name": "sharded",
            "teacher": teacher,
            "data": {"train": {"path": "unused.jsonl"}, "eval": {"path": "unused.jsonl"}},
            "task": {"kind": "classification", "label_names": ["a", "b"]},
            "artifact_root": str(root / "runs"),
            **sections,
        }
    )


def _hf_teacher_config(root: Path, dtype: str) -> PipelineConfig:
    return _config(root, {"source": "hf", "path": str(root / "teacher"), "dtype": dtype})


def _random_teacher_config(root: Path) -> PipelineConfig:
    return _config(
        root, {"source": "random", "tokenizer": str(TINY_TOKENIZER_DIR), "architecture": ARCHITECTURE, "seed": 3}
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's half of a fixed batch of 4 sequences of 12 tokens."""
    input_ids = torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(7))
    input_ids = input_ids.chunk(fd.world_size())[fd.rank()]
    return input_ids, torch.ones_like(input_ids)


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered whole (collective)."""
    return {
        name: (parameter.full_tensor() if isinstance(parameter, DTensor) else parameter).detach()
        for name, parameter in model.named_parameters()
    }


def _hidden_gradients(teacher: torch.nn.Module) -> list[torch.Tensor]:
    """The score stage's quantity: d(sum of logsumexp) / d(hidden state) at every layer."""
    input_ids, mask = _batch()
    logits, hidden = forward_with_hidden_states(teacher, input_ids, mask, LAYERS)
    loss = logits.float().logsumexp(-1).sum()
    return [gradient.detach().clone() for gradient in hidden_state_gradients(loss, [hidden[n] for n in LAYERS])]


class _WithFeatureModule(torch.nn.Module):
    """The distill step's shape: a student and a trained feature module under one root whose
    forward takes the teacher's float32 targets."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        torch.manual_seed(0)  # the same projector on every rank and in the reference, as distill seeds it
        self.feature_modules = torch.nn.ModuleDict({"projector": torch.nn.Linear(32, 32)})
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, input_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.seen["target"] = target.dtype
        hidden = self.student(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        projected = self.feature_modules["projector"](hidden.float())
        return (projected - target).square().mean()


def _student_step(module: _WithFeatureModule) -> dict[str, torch.Tensor]:
    input_ids, _ = _batch()
    target = torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(5)).chunk(fd.world_size())[fd.rank()]
    module(input_ids, target).backward()
    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for name, p in module.named_parameters()
    }


def _two_rank_worker(root_text: str) -> None:
    root = Path(root_text)
    results = {}

    # 1. An hf teacher, bf16, sharded before a single weight exists, read shard by shard.
    built_on: list[set[str]] = []
    original_fully_shard = fd.fully_shard

    def recording_fully_shard(module, **options):
        built_on.append({parameter.device.type for parameter in module.parameters()})
        return original_fully_shard(module, **options)

    fd.fully_shard = recording_fully_shard
    try:
        teacher = load_sharded_teacher(_hf_teacher_config(root, "bf16"), torch.device("cpu"))
    finally:
        fd.fully_shard = original_fully_shard
    results["built_on"] = built_on
    local = sum(parameter.to_local().numel() for parameter in teacher.parameters())
    results["local_fraction"] = local / sum(parameter.numel() for parameter in teacher.parameters())
    results["hf_dtypes"] = {parameter.dtype for parameter in teacher.parameters()}
    results["hf_full"] = _full(teacher)
    input_ids, _ = _batch()
    with torch.no_grad():
        results["hf_logits"] = teacher(input_ids=input_ids).logits

    # 2. A random teacher (no files): built once on rank 0, broadcast shard by shard.
    results["random_full"] = _full(load_sharded_teacher(_random_teacher_config(root), torch.device("cpu")))

    # 3. Activation checkpointing: the same hidden-state gradients, sharded, float32.
    config = _hf_teacher_config(root, "float32")
    results["grads_plain"] = _hidden_gradients(load_sharded_teacher(config, torch.device("cpu")))
    checkpointed = load_sharded_teacher(config, torch.device("cpu"), activation_checkpointing=True)
    results["grads_checkpointed"] = _hidden_gradients(checkpointed)
    results["checkpointed_names"] = sorted(fd.get_model_state_dict(checkpointed))

    # 4. A bf16 student: bf16 compute in the blocks, float32 in the feature module, the root's
    #    float32 targets not cast, float32 sharded weights and gradients.
    student = _WithFeatureModule(build_random_model(ARCHITECTURE, vocab_size=512, seed=1))
    computed_in: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:  # the weight as the forward sees it
            computed_in.setdefault(name, module.weight.dtype)

        return hook

    student.student.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record("block"))
    student.feature_modules["projector"].register_forward_pre_hook(record("projector"))
    fd.shard_model(
        student,
        trainable=True,
        mixed_precision=fd.BF16_MIXED_PRECISION,
        full_precision=list(student.feature_modules.values()),
    )
    grads = _student_step(student)
    results["student"] = {
        "computed_in": computed_in,
        "target": student.seen["target"],
        "weights": {parameter.dtype for parameter in student.parameters()},
        "grads": {name: grad.dtype for name, grad in grads.items()},
        "grads_values": grads,
    }
    if fd.is_main_process():
        torch.save(results, root / f"rank{fd.rank()}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sharded")
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    teacher = build_random_model(ARCHITECTURE, vocab_size=len(tokenizer), seed=2, pad_token_id=tokenizer.pad_token_id)
    teacher.save_pretrained(root / "teacher")  # float32 safetensors, no lm_head (tied)
    tokenizer.save_pretrained(root / "teacher")
    run_on_two_ranks(_two_rank_worker, str(root))
    return root, torch.load(root / "rank0.pt", weights_only=False)


def test_a_sharded_teacher_is_built_on_meta_and_each_rank_reads_only_its_shards(two_ranks):
    root, results = two_ranks
    assert results["built_on"] and all(devices == {"meta"} for devices in results["built_on"])
    assert results["local_fraction"] < 0.6  # about half of every tensor on each of two ranks
    assert results["hf_dtypes"] == {torch.bfloat16}
    reference = LlamaForCausalLM.from_pretrained(root / "teacher", dtype=torch.bfloat16)
    for name, parameter in reference.named_parameters():
        assert torch.equal(results["hf_full"][name], parameter), name
    with torch.no_grad():
        expected = reference(input_ids=_batch_of_rank0()).logits
    torch.testing.assert_close(results["hf_logits"], expected, rtol=0, atol=0)


def _batch_of_rank0() -> torch.Tensor:
    return torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(7)).chunk(2)[0]


def test_a_random_teacher_is_broadcast_from_rank_0_unchanged(two_ranks):
    root, results = two_ranks
    whole = load_teacher(_random_teacher_config(root))
    assert whole.dtype == torch.float32  # teacher.dtype defaults to float32 without use_gpu
    for name, parameter in whole.named_parameters():
        assert torch.equal(results["random_full"][name], parameter), name


def test_activation_checkpointing_keeps_the_gradients_and_the_names(two_ranks):
    _, results = two_ranks
    for plain, checkpointed in zip(results["grads_plain"], results["grads_checkpointed"], strict=True):
        assert torch.equal(plain, checkpointed)
    assert not any("checkpoint" in name for name in results["checkpointed_names"])
    assert "model.layers.0.self_attn.q_proj.weight" in results["checkpointed_names"]


def test_a_bf16_student_computes_in_bf16_and_keeps_float32_weights_and_gradients(two_ranks):
    _, results = two_ranks
    student = results["student"]
    assert student["computed_in"] == {"block": torch.bfloat16, "projector": torch.float32}
    assert student["target"] == torch.float32  # the root does not cast the teacher's targets
    assert student["weights"] == {torch.float32}
    assert set(student["grads"].values()) == {torch.float32}
    # The same step in float32 on one process: bf16 compute moves the gradients by a few percent.
    reference = _WithFeatureModule(build_random_model(ARCHITECTURE, vocab_size=512, seed=1))
    input_ids = torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(7))
    target = torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(5))
    reference(input_ids, target).backward()
    for name, parameter in reference.named_parameters():
        if parameter.grad.norm() == 0:  # embedding rows of tokens not in the batch
            continue
        error = (student["grads_values"][name] - parameter.grad).norm() / parameter.grad.norm()
        assert error < 0.05, (name, float(error))


def test_the_teacher_dtype_follows_the_device_unless_the_file_names_one(tmp_path):
    teacher = {"source": "random", "tokenizer": str(TINY_TOKENIZER_DIR), "architecture": ARCHITECTURE}
    assert _config(tmp_path, teacher).teacher.dtype == "float32"
    assert _config(tmp_path, teacher, resources={"use_gpu": True}).teacher.dtype == "bf16"
    explicit = _config(tmp_path, {**teacher, "dtype": "float32"}, resources={"use_gpu": True})
    assert explicit.teacher.dtype == "float32"
    assert load_teacher(_config(tmp_path, {**teacher, "dtype": "bf16"})).dtype == torch.bfloat16


def test_safetensors_load_in_one_process_and_a_missing_untied_tensor_is_named(tmp_path):
    tied = build_random_model(ARCHITECTURE, vocab_size=512, seed=4)
    tied.save_pretrained(tmp_path)  # no lm_head.weight in the file: it is embed_tokens
    empty = fd.materialize(
        build_on_meta(random_model_config(ARCHITECTURE, vocab_size=512), dtype=torch.bfloat16), torch.device("cpu")
    )
    fd.load_safetensors_shards(empty, tmp_path)
    for name, parameter in tied.named_parameters():
        assert torch.equal(dict(empty.named_parameters())[name], parameter.to(torch.bfloat16)), name
    untied = build_on_meta(random_model_config({**ARCHITECTURE, "tie_word_embeddings": False}, vocab_size=512))
    with pytest.raises(ValueError, match=r"the safetensors files have no tensor 'lm_head.weight' of the model"):
        fd.load_safetensors_shards(fd.materialize(untied, torch.device("cpu")), tmp_path)
