"""``student.init: prune_from_teacher`` through the pipeline: the config, ``flexkd validate``, and
the debug pipeline on a real local Ray and MLflow store, starting the student from the teacher."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexkd.cli import main
from flexkd.config.schema import ConfigError, parse_config
from flexkd.models.plan import build_student, load_teacher, plan_models
from flexkd.pipeline.runner import run_pipeline
from flexkd.prune.student import hidden_units_by_importance, kept_layer_indices

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
DEBUG = PIPELINES / "debug.yaml"
# Half the debug teacher's width (64), half its depth (4 blocks), one of its two KV groups.
PRUNED = {
    "init": "prune_from_teacher",
    "architecture": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_key_value_heads": 1},
}


def pruned_debug_config(root: Path, **overrides):
    """The debug pipeline with a pruned student, the defaults of a pruned student left to apply
    (no layer_map, no selection method), its artifacts and MLflow store under ``root``."""
    raw = yaml.safe_load(DEBUG.read_text())
    raw.pop("layer_map")
    raw.pop("selection")
    # A copy: the overrides below write into the student section, and PRUNED is shared by every test.
    raw |= {
        "student": copy.deepcopy(PRUNED),
        "artifact_root": str(root),
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
    }
    for dotted, value in overrides.items():
        section = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            section = section.setdefault(key, {})
        section[leaf] = value
    return parse_config(raw, source="debug.yaml", base=PIPELINES)


# --- config and validate ------------------------------------------------------------------------


def test_a_pruned_student_defaults_to_its_source_blocks_and_identity_pairing(tmp_path):
    config = pruned_debug_config(tmp_path)
    assert (config.layer_map, config.selection.method, config.student.layer_selection) == (
        "source",
        "identity",
        "uniform",
    )
    plan = plan_models(config)
    # Uniform 4 -> 2 keeps teacher blocks 0 and 3: their outputs are hidden states 1 and 4.
    assert plan.layer_pairs == ((1, 1), (4, 2)) and plan.k == 32 and plan.student_hidden == 32
    # The file still decides when it says so.
    chosen = pruned_debug_config(tmp_path, layer_map="last", **{"selection.method": "importance"})
    assert (chosen.layer_map, chosen.selection.method) == ("last", "importance")
    # Blocks chosen by their scores are known only once the score stage ran.
    assert plan_models(pruned_debug_config(tmp_path, **{"student.layer_selection": "importance"})).layer_pairs is None


def _validate(capsys, *settings: str) -> tuple[int, str]:
    code = main(["validate", str(DEBUG), *(part for setting in settings for part in ("--set", setting))])
    return code, capsys.readouterr().err


PRUNE = ("student.init=prune_from_teacher",)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            (*PRUNE, "student.architecture.hidden_size=96"),
            "student.architecture.hidden_size = 96 exceeds the teacher's 64",
        ),
        (
            (*PRUNE, "student.architecture.num_hidden_layers=6"),
            "student.architecture.num_hidden_layers = 6 exceeds the teacher's 4",
        ),
        (
            (*PRUNE, "student.architecture={hidden_size: 32, num_attention_heads: 3}"),
            "student.architecture.num_attention_heads = 3 is not a multiple of the teacher's 2 query heads per key/value "
            "head: heads are pruned as whole groups",
        ),
        (
            (*PRUNE, "student.architecture={hidden_size: 30, num_key_value_heads: 2}"),
            "student.architecture.hidden_size = 30 is not a multiple of the 4 attention heads that num_key_value_heads = 2 "
            "keeps (LlamaConfig requires it)",
        ),
        (
            (
                *PRUNE,
                "teacher.architecture={model_type: gpt2, hidden_size: 64, num_hidden_layers: 4, num_attention_heads: 4}",
            ),
            "student.init 'prune_from_teacher': pruning supports llama-family models (llama, mistral, qwen2, qwen3); "
            "got 'gpt2'",
        ),
        (
            (*PRUNE, "student.architecture.head_dim=8"),
            f"{DEBUG}: student: student.architecture.head_dim: a pruned student keeps the teacher's; init "
            "'prune_from_teacher' takes only hidden_size, num_hidden_layers, intermediate_size, num_attention_heads, "
            "num_key_value_heads",
        ),
        (
            ("student.layer_selection=importance",),
            f"{DEBUG}: student: student.layer_selection 'importance' applies only to init 'prune_from_teacher'",
        ),
        (
            ("layer_map=source",),
            f"{DEBUG}: <top level>: layer_map 'source' (each student block with the teacher block it was cut from) needs "
            "student.init 'prune_from_teacher'",
        ),
    ],
)
def test_bad_pruning_targets_are_one_line_from_validate(capsys, settings, message):
    code, err = _validate(capsys, *settings)
    assert code == 2
    assert err == f"flexkd: config error: {message}\n"


def test_validate_accepts_a_pruned_student_and_names_its_pairs(capsys):
    assert main(["validate", str(DEBUG), "--set", "student.init=prune_from_teacher", "--set", "layer_map=source"]) == 0
    assert "student d=32 L=2, k=32, layer pairs [(1, 1), (4, 2)]" in capsys.readouterr().out


def test_a_pruned_student_needs_the_score_stage_weights(tmp_path):
    with pytest.raises(ValueError, match="pruned weights are the score stage's"):
        build_student(pruned_debug_config(tmp_path))
    with pytest.raises(ConfigError, match=r"pruning/selection.json is missing; rerun the score stage"):
        plan_models(pruned_debug_config(tmp_path), score_dir=tmp_path)


@pytest.mark.parametrize("layer_map", ["source", "last"])
def test_a_pruned_students_units_are_ranked_at_every_block_it_keeps_whatever_the_layer_map(tmp_path, layer_map):
    """With layer_map 'last' the units were once ranked at the last block alone: a 504-wide cut of
    SmolLM2 then started at perplexity 80.5 on SAMSum references, against 59.6 ranked at all blocks
    (benchmarks/results/prune_shapes.md). Only the 'last' case tells the two rules apart."""
    from stages.score import _prune_student

    config = pruned_debug_config(tmp_path, layer_map=layer_map)
    generator = torch.Generator().manual_seed(0)
    # The last block favours other units than the first: the two rankings disagree.
    residual = torch.rand(4, 64, generator=generator)
    residual[3, :32] += 10.0
    residual[0, 32:] += 10.0
    scores = {
        "residual": residual,
        "mlp": torch.rand(4, 128, generator=generator),
        "attention": torch.rand(4, 2, generator=generator),
        "block_change": torch.rand(4, generator=generator),
        "examples": torch.tensor(8),
        "tokens": torch.tensor(64),
    }
    _prune_student(config, load_teacher(config), scores, tmp_path)

    selection = json.loads((tmp_path / "pruning" / "selection.json").read_text())
    kept = selection["kept_layers"]
    assert kept == [0, 3]
    expected = hidden_units_by_importance({block: residual[block] for block in kept}, 32)
    assert selection["hidden_units"] == expected.tolist()
    assert selection["hidden_units"] != hidden_units_by_importance({3: residual[3]}, 32).tolist()


# --- the pipeline -------------------------------------------------------------------------------


@pytest.mark.integration  # a full debug pipeline: about 1 min
def test_the_debug_pipeline_distills_a_student_pruned_from_the_teacher(tmp_path, local_ray):
    # A learning rate so small that 12 AdamW steps move no weight by more than ~1e-6: what
    # distill saves is then what it started from.
    config = pruned_debug_config(tmp_path, **{"training.learning_rate": 1e-7})
    result = run_pipeline(config, stages=("tokenize", "score", "distill", "evaluate"))
    assert [record.cached for record in result.stages.values()] == [False] * 4

    score = result.stages["score"].directory
    selection = json.loads((score / "pruning" / "selection.json").read_text())
    units = selection["hidden_units"]
    assert selection["kept_layers"] == [0, 3] and selection["layer_pairs"] == [[1, 1], [4, 2]]
    assert len(units) == 32 and len(set(units)) == 32
    scores = load_file(score / "pruning" / "scores.safetensors")
    assert scores["residual"].shape == (4, 64) and scores["mlp"].shape == (4, 128)
    assert scores["attention"].shape == (4, 2) and int(scores["examples"]) == 128  # the train split scores

    # Identity pairing: student unit i with teacher unit units[i], at every mapped layer.
    selected = json.loads((score / "selected.json").read_text())["layers"]
    assert set(selected) == {"1", "4"}
    assert all(entry["indices"] == units and entry["method"] == "identity" for entry in selected.values())

    # The pruned student is the teacher's weights, sliced: embedding columns at the kept units,
    # and block 3's keys from its more important KV group.
    teacher = load_teacher(config)
    pruned = AutoModelForCausalLM.from_pretrained(score / "pruned_student")
    teacher_embedding = teacher.get_input_embeddings().weight
    assert torch.equal(pruned.get_input_embeddings().weight, teacher_embedding[:, units])
    group = int(scores["attention"][3].argmax())
    head_dim = teacher.config.head_dim
    teacher_keys = teacher.model.layers[3].self_attn.k_proj.weight[group * head_dim : (group + 1) * head_dim]
    assert torch.equal(pruned.model.layers[1].self_attn.k_proj.weight, teacher_keys[:, units])
    assert pruned.config.head_dim == head_dim == 16  # the teacher's, not 32 // 2

    # Distill started from those weights (a random start would be nowhere near them).
    distilled = AutoModelForCausalLM.from_pretrained(result.stages["distill"].outputs["student_dir"])
    assert not torch.equal(distilled.get_input_embeddings().weight, teacher_embedding[:, units])  # it trained
    torch.testing.assert_close(distilled.get_input_embeddings().weight, teacher_embedding[:, units], atol=1e-5, rtol=0)
    metrics = result.stages["evaluate"].outputs["metrics"]
    assert 0 <= metrics["student.accuracy"] <= 1

    # student.init is recorded: params and tags of the pipeline run, stage outputs and manifests.
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.data.params["student.init"] == "prune_from_teacher"
    assert parent.data.tags["flexkd.student.init"] == "prune_from_teacher"
    assert client.get_run(result.stages["score"].run_id).data.tags["flexkd.student.init"] == "prune_from_teacher"
    for stage in ("score", "distill"):
        manifest = json.loads((result.stages[stage].directory / "manifest.json").read_text())
        assert manifest["config"]["student"]["init"] == "prune_from_teacher"
        assert manifest["outputs"]["student_init"] == "prune_from_teacher"
    assert {item.path for item in client.list_artifacts(result.stages["score"].run_id, "pruning")} == {
        "pruning/scores.safetensors",
        "pruning/selection.json",
    }


@pytest.mark.slow
def test_blocks_kept_by_their_block_change_set_the_layer_pairs_of_distill(tmp_path, local_ray):
    config = pruned_debug_config(tmp_path, **{"student.layer_selection": "importance"})
    result = run_pipeline(config, stages=("tokenize", "score", "distill"))
    score = result.stages["score"].directory
    selection = json.loads((score / "pruning" / "selection.json").read_text())
    block_change = load_file(score / "pruning" / "scores.safetensors")["block_change"]
    kept = kept_layer_indices(4, 2, "importance", block_change)
    assert selection["kept_layers"] == kept and kept[-1] == 3
    pairs = [[block + 1, student] for student, block in enumerate(kept, start=1)]
    assert result.stages["score"].outputs["layer_pairs"] == pairs
    assert sorted(json.loads((score / "selected.json").read_text())["layers"]) == sorted(str(t) for t, _ in pairs)
    assert plan_models(config, score).layer_pairs == tuple(map(tuple, pairs))
    assert result.stages["distill"].outputs["steps"] == 12


@pytest.mark.integration  # the debug pipeline's tokenize and score stages: about 30 s each
@pytest.mark.parametrize("workers", [1, 2])
def test_blocks_kept_by_perplexity_are_those_whose_skipping_raises_the_score_rows_loss_most(
    tmp_path, local_ray, workers
):
    """With two workers the teacher is FSDP2-sharded: each worker scores 4 of the 9 rows in
    batches of 3 (3 + 1 rows), then worker 0 the ninth, alone, while worker 1, run out, repeats
    its last batch with weight 0. The skip losses are all-reduced to those of all 9 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flexkd.data.rows import collate_batch
    from flexkd.data.shards import shard_files
    from flexkd.method.objective import summed_task_loss
    from flexkd.prune.scores import skipped_block_loss_sums

    config = pruned_debug_config(
        tmp_path,
        **{
            "student.layer_selection": "perplexity",
            "data.score": {"path": "../flexkd/assets/samples/sst2_train.jsonl", "limit": 9},
            "scoring.batch_size": 3,
            "resources.num_workers": workers,
            "resources.cpus_per_worker": 0.5,
        },
    )
    result = run_pipeline(config, stages=("tokenize", "score"))
    assert int(load_file(result.stages["score"].directory / "pruning" / "scores.safetensors")["examples"]) == 9
    score, tokenize = result.stages["score"].directory, result.stages["tokenize"].directory
    scores = load_file(score / "pruning" / "scores.safetensors")
    selection = json.loads((score / "pruning" / "selection.json").read_text())
    assert selection["kept_layers"] == kept_layer_indices(4, 2, "perplexity", scores["skip_loss"])

    # The worker's sums are the loss of every score row with each block skipped, recomputed here.
    manifest = json.loads((tokenize / "manifest.json").read_text())["outputs"]
    verbalizers = torch.tensor(manifest["verbalizer_ids"])
    rows = pa.concat_tables([pq.read_table(shard) for shard in shard_files(tokenize / "score")]).to_pydict()
    batch = collate_batch(rows, manifest["pad_token_id"])
    teacher = load_teacher(config).eval()
    expected = skipped_block_loss_sums(
        teacher, batch, lambda logits, rows: summed_task_loss(config.task.kind, logits, rows, verbalizers)
    )
    torch.testing.assert_close(scores["skip_loss"].double(), expected, rtol=1e-4, atol=1e-3)
    with torch.no_grad():  # the baseline of the increases: the loss with no block skipped
        whole = summed_task_loss(
            config.task.kind,
            teacher(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits,
            batch,
            verbalizers,
        )
    torch.testing.assert_close(scores["task_loss"].double(), whole.double(), rtol=1e-4, atol=1e-3)
    increase = (expected - scores["task_loss"].double()) / int(scores["examples"])
    assert selection["loss_increase_when_skipped"] == pytest.approx(increase.tolist(), abs=1e-3)
