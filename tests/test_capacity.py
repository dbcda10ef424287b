"""flexkd plan: per-stage memory, FLOPs and cache size from model configs built on the meta device.

The formulas are checked against what a real forward keeps (saved tensors of a tiny Llama) and
then used at 8B scale, where the plan must say that sharded bf16 loading and activation
checkpointing make a 4-GPU run fit 80 GB, and that it does not fit without them.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexkd import distributed as fd
from flexkd.cli import main
from flexkd.config.schema import ConfigError, load_config
from flexkd.models import loading
from flexkd.models.capacity import (
    GB,
    Hardware,
    ModelShape,
    cache_bytes_per_token,
    parse_memory,
    plan_distill,
    plan_pipeline,
    plan_score,
)
from flexkd.models.plan import plan_models

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = REPO_ROOT / "pipelines"
LLAMA_8B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
)
STUDENT_1B = LlamaConfig(
    hidden_size=2048,
    num_hidden_layers=16,
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    tie_word_embeddings=True,
)


def _saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the tensors a forward saves for its backward, weights excluded."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids)
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_formula_matches_what_a_forward_keeps(checkpointing):
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if checkpointing:
        fd.checkpoint_activations(model)
    input_ids = torch.randint(0, 256, (2, 128))
    measured = _saved_activation_bytes(model, input_ids)
    planned = input_ids.numel() * ModelShape.of(config).kept_values_per_token(checkpointing) * 4
    assert abs(measured - planned) / measured < 0.03, (measured, planned)


def test_parameters_are_counted_on_meta_with_tied_weights_once():
    teacher, student = ModelShape.of(LLAMA_8B), ModelShape.of(STUDENT_1B)
    assert teacher.parameters == 8_030_261_248  # Llama-3-8B's published count
    assert teacher.root_parameters == 2 * 128256 * 4096 + 4096  # embeddings, LM head, final norm
    assert student.root_parameters == 128256 * 2048 + 2048  # the LM head is the embedding
    assert 1.2e9 < student.parameters < 1.3e9


def test_an_8b_teacher_on_4_gpus_fits_80gb_only_sharded_in_bf16_with_checkpointing():
    """Batch 8 x 2048 per rank, generation (every position's logits), 4 GPUs of 80 GB."""
    teacher, student = ModelShape.of(LLAMA_8B), ModelShape.of(STUDENT_1B)
    hardware = Hardware(gpus=4, memory=parse_memory("80GB"))

    def stages(bf16: bool, sharded: bool, checkpointing: bool):
        weight_bytes = 2 if bf16 else 4
        return [
            plan_score(teacher, hardware, 8, 2048, weight_bytes, "generation", checkpointing, sharded),
            plan_distill(
                student, teacher, hardware, 8, 2048, weight_bytes, weight_bytes, "generation", checkpointing, sharded
            ),
        ]

    fitted = stages(bf16=True, sharded=True, checkpointing=True)
    assert all(stage.fits(hardware) for stage in fitted), [stage.total / GB for stage in fitted]
    without_all = stages(bf16=False, sharded=False, checkpointing=False)
    assert not any(stage.fits(hardware) for stage in without_all)
    # Each alone matters: the score stage's activations need checkpointing at this batch...
    score = stages(bf16=True, sharded=True, checkpointing=False)[0]
    assert not score.fits(hardware) and score.memory["activations"] > 80 * GB
    # ...and a whole float32 teacher on every rank leaves no room in score.
    assert not stages(bf16=False, sharded=False, checkpointing=True)[0].fits(hardware)
    # The sharded bf16 teacher is a quarter of 16 GB on each rank.
    assert fitted[0].memory["weights"] == pytest.approx(teacher.parameters * 2 / 4)


def test_classification_reads_one_position_of_the_vocabulary():
    student, teacher = ModelShape.of(STUDENT_1B), ModelShape.of(LLAMA_8B)
    hardware = Hardware(gpus=4, memory=80 * GB)
    generation = plan_distill(student, teacher, hardware, 8, 2048, 2, 2, "generation", True)
    classification = plan_distill(student, teacher, hardware, 8, 2048, 2, 2, "classification", True)
    assert generation.memory["logits"] == pytest.approx(2048 * classification.memory["logits"])
    # Score computes every position's logits either way (the loss reads one in classification).
    score = plan_score(teacher, hardware, 8, 2048, 2, "classification", True)
    assert score.memory["logits"] == 8 * 2048 * 128256 * 4


def test_flops_are_6_p_tokens_for_training_and_2_p_tokens_for_a_forward():
    student, teacher = ModelShape.of(STUDENT_1B), ModelShape.of(LLAMA_8B)
    hardware = Hardware(gpus=4, memory=80 * GB)
    tokens = 4 * 8 * 2048
    cached = plan_distill(student, None, hardware, 8, 2048, 2, 2, "generation", checkpointing=False)
    assert cached.flops == 6 * student.parameters * tokens
    online = plan_distill(student, teacher, hardware, 8, 2048, 2, 2, "generation", checkpointing=True)
    assert online.flops == (8 * student.parameters + 2 * teacher.parameters) * tokens  # + one recompute
    score = plan_score(teacher, hardware, 8, 2048, 2, "generation", checkpointing=False)
    assert score.flops == 4 * teacher.parameters * tokens  # forward and backward to the hidden states
    ranked = plan_score(teacher, hardware, 8, 2048, 2, "generation", False, skipped_block_forwards=True)
    assert ranked.flops == (4 + 2 * 32) * teacher.parameters * tokens and ranked.memory == score.memory


def test_the_cache_stores_k_float16_units_per_mapped_layer_and_token():
    assert cache_bytes_per_token(16, 2048, "classification", 32, 2) == 16 * 2048 * 2 + 8
    assert cache_bytes_per_token(1, 192, "generation", 32, 2) == 192 * 2 + 8 + 32 * 8 + 2 * 4


def test_gpu_memory_sizes_parse_and_a_bad_one_is_one_line():
    assert parse_memory("80GB") == 80e9 and parse_memory("141 GiB") == 141 * 2**30 and parse_memory("40") == 40e9
    with pytest.raises(ConfigError, match="--gpu-memory 'eighty': expected a size such as 80GB"):
        parse_memory("eighty")


def test_flexkd_plan_prints_every_stage_of_the_8b_pipeline(capsys):
    assert main(["plan", str(PIPELINES / "llama8b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "4 GPU(s) of 80 GB" in out and "teacher 8.03B parameters, bf16; student 1.24B parameters, bf16" in out
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split()[0] in ("score", "targets", "distill", "evaluate")
    }
    assert set(rows) == {"score", "targets", "distill", "evaluate"}
    assert "yes" in rows["score"] and "yes" in rows["distill"]
    assert "runs with training.teacher: cache" in rows["targets"]  # this pipeline runs the teacher online
    assert "kB per token (16 layers x 2048 units float16 + top-32 logits)" in out
    # On two GPUs the same pipeline does not fit: distill's logits and weights double per rank.
    assert main(["plan", str(PIPELINES / "llama8b.yaml"), "--gpus", "2"]) == 0
    assert " NO " in capsys.readouterr().out


def test_flexkd_plan_prints_the_quickstart_without_fetching_the_teacher(tmp_path, monkeypatch, capsys):
    """The quickstart's demo teacher, as a finished folder holding only SmolLM2-135M's config."""
    folder = tmp_path / loading.DEMO_TEACHER_FOLDER
    folder.mkdir()
    (folder / loading._DONE_MARKER).write_text("done\n")
    smollm2 = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(smollm2))
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path))
    assert main(["plan", str(PIPELINES / "quickstart.yaml"), "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "1 GPU(s) of 24 GB" in out and "teacher 134.5M parameters, float32" in out
    assert "(4 layers x 192 units float16)" in out  # layer_map uniform over 4 student blocks, k = 192


def test_validate_warns_in_one_line_when_the_plan_does_not_fit(capsys, monkeypatch):
    # The 8B pipeline's tokenizer and data live on the cluster's volume; here only its shapes are
    # checked (the rest of the preflight has its own tests).
    monkeypatch.setattr("flexkd.pipeline.preflight.preflight", plan_models)
    llama8b = str(PIPELINES / "llama8b.yaml")
    assert main(["validate", llama8b]) == 0
    assert capsys.readouterr().err == ""
    assert main(["validate", llama8b, "--set", "training.activation_checkpointing=false"]) == 0
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("flexkd: warning: the plan does not fit 80 GB per GPU: score needs ")
    assert "(activations " in warning


def test_the_8b_pipeline_plan_is_computed_from_its_config():
    config = load_config(PIPELINES / "llama8b.yaml")
    plan = plan_pipeline(config, Hardware(4, 80 * GB), "llama8b")
    assert plan.teacher == ModelShape.of(
        LLAMA_8B.__class__.from_pretrained(PIPELINES / "shapes" / "llama-3.1-8b-instruct")
    )
    assert not plan.not_fitting()


def test_docs_scaling_shows_what_scripts_scaling_table_prints(capsys):
    runpy.run_path(str(REPO_ROOT / "scripts" / "scaling_table.py"), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    page = (REPO_ROOT / "docs" / "SCALING.md").read_text()
    shown = page.split("<!-- scripts/scaling_table.py -->\n", 1)[1].split("\n<!-- end scripts/scaling_table.py -->")[0]
    assert shown == printed, "docs/SCALING.md is stale: paste the output of python scripts/scaling_table.py"
