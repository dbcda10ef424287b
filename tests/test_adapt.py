"""The adapt stage (teacher.adapt) and the score stage's teacher competence check."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flexkd.config.schema import ConfigError, apply_overrides, load_config, parse_config
from flexkd.data.rows import ROW_SCHEMA, tokenize_rows, verbalizer_token_ids
from flexkd.errors import StageError
from flexkd.models.loading import load_model
from flexkd.models.plan import ADAPTED_TEACHER_DIR, load_pipeline_tokenizer, load_teacher, plan_models
from flexkd.pipeline.runner import PipelineResult, StageRecord, run_pipeline, summary_table
from flexkd.stages import adapt
from flexkd.stages.adapt import HISTORY, AdaptLoop, adapt_teacher
from flexkd.stages.score import CHANCE_MARGIN, competence_warning

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
FILLER = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "story",
    "music",
    "ending",
    "camera",
    "script",
    "cast",
    "day",
]
KEYWORDS = ["awful", "wonderful", "boring", "thrilling"]  # class c's rows hold KEYWORDS[c]


def keyword_rows(path: Path, rows: int, classes: int, seed: int = 0) -> Path:
    """A task a tiny model learns in a few epochs: the class is which keyword the sentence holds."""
    generator = random.Random(seed)
    with path.open("w") as file:
        for _ in range(rows):
            label = generator.randrange(classes)
            words = generator.choices(FILLER, k=6)
            words.insert(generator.randrange(len(words) + 1), KEYWORDS[label])
            file.write(json.dumps({"sentence": " ".join(words), "label": label}) + "\n")
    return path


def debug_config(root: Path, classes: int = 2, train_rows: int = 160, **overrides):
    """The debug pipeline on the keyword task, its artifacts and MLflow store under ``root``."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "artifact_root": str(root),
        "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
        "data.train": {"path": str(keyword_rows(root / "train.jsonl", train_rows, classes))},
        "data.eval": {"path": str(keyword_rows(root / "eval.jsonl", 32, classes, seed=1))},
        "task.label_names": ["negative", "positive", "dull", "gripping"][:classes],
        "resources.threads_per_worker": 1,  # the machine is shared: more threads only contend
    }
    return parse_config(apply_overrides(raw, {**settings, **overrides}))


ADAPT = {"trainable": "all", "learning_rate": 0.003, "epochs": 4, "batch_size": 16, "heldout_rows": 32}


def _tokenized_rows(config, directory: Path) -> Path:
    """What the tokenize stage writes for the training split, without Ray."""
    tokenizer = load_pipeline_tokenizer(config)
    lines = [json.loads(line) for line in Path(config.data.train.path).read_text().splitlines()]
    columns = {key: [line[key] for line in lines] for key in lines[0]}
    rows = tokenize_rows(columns, tokenizer, config.task, config.data.max_length)
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=ROW_SCHEMA), directory / "part-0.parquet")
    return directory


def _adapt_in_process(config, tmp_path: Path) -> dict:
    tokenizer = load_pipeline_tokenizer(config)
    loop = AdaptLoop(
        config=config,
        rows_dir=_tokenized_rows(config, tmp_path / "train"),
        heldout_rows=config.teacher.adapt.heldout_count(160),
        pad_token_id=tokenizer.pad_token_id,
        verbalizer_ids=verbalizer_token_ids(tokenizer, config.task.label_names),
        output_dir=tmp_path,
        progress_bars=False,
    )
    adapt_teacher(loop)
    return json.loads((tmp_path / HISTORY).read_text())


def test_the_adapted_teacher_beats_the_random_one_on_its_held_out_rows(tmp_path, capfd):
    config = debug_config(tmp_path, **{"teacher.adapt": ADAPT})
    history = _adapt_in_process(config, tmp_path)
    # Off a terminal the steps show as progress lines (one at least where the loop ended).
    assert "adapt: 32/32 steps (100%)" in capfd.readouterr().out
    before, kept = history["measurements"][0], history["kept"]
    assert history["steps"] == 4 * (128 // 16) and len(history["measurements"]) == 5
    assert kept["accuracy"] >= before["accuracy"] + 0.2 and kept["epoch"] >= 1, history
    teacher = load_model(tmp_path / ADAPTED_TEACHER_DIR)
    assert teacher.config.tie_word_embeddings is False and (tmp_path / ADAPTED_TEACHER_DIR / "tokenizer.json").is_file()


def test_head_training_moves_only_the_verbalizer_rows_of_an_untied_output_layer(tmp_path):
    config = debug_config(tmp_path, **{"teacher.adapt": {**ADAPT, "trainable": "head", "epochs": 1}})
    _adapt_in_process(config, tmp_path)
    original = load_teacher(config).state_dict()  # the seeded random base, as every stage builds it
    adapted = load_file(tmp_path / ADAPTED_TEACHER_DIR / "model.safetensors")
    tokenizer = load_pipeline_tokenizer(config)
    rows = verbalizer_token_ids(tokenizer, config.task.label_names)
    changed = (adapted["lm_head.weight"] != original["lm_head.weight"]).any(dim=1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(rows)
    for name, value in adapted.items():
        if name != "lm_head.weight":
            torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)


def test_adapt_settings_that_do_not_fit_are_refused_in_one_line(tmp_path):
    cases = {
        "top_blocks": (
            {"trainable": "top_blocks"},
            r"teacher\.adapt: trainable 'top_blocks' needs teacher\.adapt\.top_blocks",
        ),
        "stray blocks": ({"trainable": "head", "top_blocks": 2}, r"top_blocks applies only to trainable 'top_blocks'"),
        "both lengths": ({"epochs": 1, "steps": 5}, r"give epochs or steps, not both"),
        "both slices": ({"heldout_rows": 8, "heldout_fraction": 0.2}, r"heldout_rows or heldout_fraction, not both"),
        "fraction": ({"heldout_fraction": 1.5}, r"teacher\.adapt\.heldout_fraction: Input should be less than 1"),
        "typo": ({"learning_rat": 0.1}, r"teacher\.adapt\.learning_rat: unknown key"),
        "mode": ({"trainable": "lora"}, r"teacher\.adapt\.trainable: Input should be 'all', 'top_blocks' or 'head'"),
    }
    for name, (settings, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as error:
            debug_config(tmp_path, **{"teacher.adapt": settings})
        assert len(str(error.value).splitlines()) == 1, name
    with pytest.raises(ConfigError, match=r"batch_size = 15 is not a multiple of resources\.num_workers = 2"):
        debug_config(tmp_path, **{"teacher.adapt": {"batch_size": 15}, "resources.num_workers": 2})
    assert debug_config(tmp_path, **{"teacher.adapt": {"register": False}}).teacher.adapt.register_model is False


def test_the_competence_warning_names_the_accuracy_and_the_fix():
    near_chance = competence_warning(0.27, 4, None, 128)
    assert "0.270" in near_chance and "0.250 for 4 classes" in near_chance and "teacher.adapt" in near_chance
    assert competence_warning(0.25 + CHANCE_MARGIN + 0.01, 4, None, 128) is None
    assert "below teacher.min_accuracy 0.8" in competence_warning(0.7, 2, 0.8, 128)
    assert competence_warning(0.9, 2, 0.8, 128) is None and competence_warning(None, 0, None, 1) is None


def test_the_summary_says_when_the_student_beats_the_teacher(tmp_path):
    config = debug_config(tmp_path)
    result = PipelineResult(config, "run", "sqlite://")
    metrics = {"teacher.accuracy": 0.7, "student.accuracy": 0.75}
    result.stages["evaluate"] = StageRecord(
        "evaluate", tmp_path, "f", {"metrics": metrics, "primary_metric": "accuracy"}, 1.0, False, None
    )
    result.stages["score"] = StageRecord("score", tmp_path, "f", {"teacher": {"accuracy": 0.5}}, 1.0, False, None)
    table = summary_table(result)
    assert "| accuracy | 0.7 | 0.75 |" in table and "the student beats the teacher on accuracy: 0.75 vs 0.7" in table
    assert "teacher on its scoring rows: accuracy 0.5" in table
    result.stages["evaluate"].outputs["metrics"]["student.accuracy"] = 0.6
    assert "beats" not in summary_table(result)


@pytest.mark.integration  # the debug pipeline with adapt, a cached rerun, a rerun from adapt on: 7 min on 2 busy cores
def test_the_pipeline_adapts_the_teacher_first_and_reruns_from_adapt_when_it_changes(tmp_path, local_ray):
    config = debug_config(tmp_path, **{"teacher.adapt": ADAPT})
    result = run_pipeline(config)
    assert list(result.stages) == ["tokenize", "adapt", "score", "distill", "evaluate", "register"]
    adapt = result.stages["adapt"].outputs
    assert adapt["heldout_after"]["accuracy"] > adapt["heldout_before"]["accuracy"]
    assert adapt["teacher_name"] == "debug-teacher" and adapt["model_uri"] == "models:/debug-teacher/1"
    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version("debug-teacher", "1")
    assert version.tags["flexkd.data_fingerprint"] == result.stages["tokenize"].fingerprint
    assert float(version.tags["heldout.after.accuracy"]) == adapt["heldout_after"]["accuracy"]
    assert {"heldout.before.accuracy", "heldout.after.loss"} <= set(
        client.get_run(result.stages["adapt"].run_id).data.metrics
    )
    # Every later stage ran with the adapted teacher: the student's lineage names it.
    student = result.stages["register"].outputs
    tags = client.get_model_version(student["model_name"], str(student["version"])).tags
    assert tags["flexkd.teacher.name"] == "debug-teacher" and tags["flexkd.teacher.version"] == "1"
    assert result.stages["score"].outputs["teacher"]["accuracy"] > 0.8  # the keyword task, learned

    again = run_pipeline(config)
    assert all(record.cached for record in again.stages.values())

    changed = run_pipeline(debug_config(tmp_path, **{"teacher.adapt": {**ADAPT, "learning_rate": 0.001}}))
    assert [name for name, record in changed.stages.items() if record.cached] == ["tokenize"]


@pytest.mark.integration  # tokenize and score, then score again: 2.5 min on 2 busy cores
def test_a_random_teacher_on_four_classes_is_warned_about_or_refused(tmp_path, local_ray, caplog):
    config = debug_config(tmp_path, classes=4)
    with caplog.at_level(logging.WARNING, logger="flexkd"):
        result = run_pipeline(config, stages=("tokenize", "score"))
    warnings = [record.getMessage() for record in caplog.records if "teacher.adapt" in record.getMessage()]
    competence = result.stages["score"].outputs["teacher"]
    assert len(warnings) == 1 and f"{competence['accuracy']:.3f}" in warnings[0] and "4 classes" in warnings[0]
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.stages["score"].run_id).data.tags["flexkd.teacher_warning"] == competence["warning"]
    assert client.get_run(result.run_id).data.tags["flexkd.teacher_warning"] == competence["warning"]

    strict = debug_config(tmp_path, classes=4, **{"teacher.require_competent": True})
    with pytest.raises(StageError, match=r"^score: the teacher's accuracy .* \(teacher\.require_competent\)$") as error:
        run_pipeline(strict, stages=("tokenize", "score"))
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.integration  # the adapt stage with one worker, then two: 3 min on 2 busy cores
def test_two_adapt_workers_train_the_teacher_one_worker_trains(tmp_path, local_ray):
    teachers = {}
    for workers in (1, 2):
        overrides = {"teacher.adapt": {**ADAPT, "epochs": 2, "register": False}, "resources.num_workers": workers}
        result = run_pipeline(debug_config(tmp_path / str(workers), **overrides), stages=("tokenize", "adapt"))
        teachers[workers] = result.stages["adapt"]
        assert result.stages["adapt"].outputs["steps"] == 2 * (128 // 16)
    one, two = (load_file(record.directory / ADAPTED_TEACHER_DIR / "model.safetensors") for record in teachers.values())
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert teachers[1].outputs["heldout_after"] == pytest.approx(teachers[2].outputs["heldout_after"], abs=1e-5)


def test_more_top_blocks_than_the_teacher_has_are_refused_before_anything_runs(tmp_path):
    config = debug_config(tmp_path, **{"teacher.adapt": {"trainable": "top_blocks", "top_blocks": 5}})
    with pytest.raises(ConfigError, match=r"^teacher\.adapt\.top_blocks = 5: the teacher has 4 blocks$"):
        plan_models(config)


def test_too_few_training_rows_for_a_batch_are_refused_before_any_worker_starts(tmp_path):
    config = debug_config(tmp_path, **{"teacher.adapt": ADAPT})
    tokenize_dir = tmp_path / "tokenize"
    tokenize_dir.mkdir()
    outputs = {"rows": {"train": 40}, "pad_token_id": 0, "verbalizer_ids": [1, 2]}
    (tokenize_dir / "manifest.json").write_text(json.dumps({"fingerprint": "f", "outputs": outputs}))
    message = (
        r"^adapt: 40 training rows less 32 held out leave fewer than one batch of teacher\.adapt\.batch_size = 16$"
    )
    with pytest.raises(StageError, match=message):
        adapt.run(config, {"tokenize": tokenize_dir}, tmp_path / "adapt")
