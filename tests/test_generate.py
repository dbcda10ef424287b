"""Sequence-level KD: the generate stage (the teacher's responses as the training targets), its
config section, and the fluency measures the evaluate stage reports for generation tasks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from flexkd.config.schema import ConfigError, GenerateConfig, apply_overrides, load_config, parse_config
from flexkd.data.rows import prompt_token_ids
from flexkd.data.splits import GENERATED_TRAIN_FILE, check_data
from flexkd.errors import StageError
from flexkd.evaluation.metrics import distinct_n, fluency_scores, is_one_repeated_ngram
from flexkd.models.plan import load_pipeline_tokenizer, load_teacher
from flexkd.pipeline.runner import pipeline_stages, planned_fingerprint, run_pipeline
from flexkd.stages.generate import (
    _BLANK,
    TeacherResponses,
    _response_counts,
    _response_rows,
    _too_few_responses,
    _write_responses,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = REPO_ROOT / "pipelines"
SAMSUM = REPO_ROOT / "flexkd" / "assets" / "samples" / "samsum.jsonl"
TEMPLATE = "Summarize: {dialogue}"


def generation_debug(root: Path, **overrides):
    """The debug pipeline as a SAMSum generation task with a generate section, under ``root``."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    split = {"path": str(SAMSUM), "prompt_template": TEMPLATE, "response_column": "summary"}
    raw = apply_overrides(
        raw,
        {
            "artifact_root": str(root),
            "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
            "task": {"kind": "generation"},
            "data.train": {**split, "limit": 24},
            "data.eval": {**split, "limit": 8},
            "data.max_length": 96,
            "training.steps": 4,
            "training.log_every": 2,
            "evaluation.max_new_tokens": 6,
            "generate": {"max_new_tokens": 8, "batch_size": 8},
            **overrides,
        },
    )
    return parse_config(raw)


# --- the config section -----------------------------------------------------------------------


def test_a_classification_pipeline_with_generate_is_refused_in_one_line(tmp_path):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    with pytest.raises(
        ConfigError, match=r"^x.yaml: <top level>: generate .* needs task.kind 'generation', not 'classification'$"
    ):
        parse_config(apply_overrides(raw, {"generate": {"max_new_tokens": 8}}), source="x.yaml")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0.7}, r"generate: temperature applies only with do_sample: true"),
        ({"top_p": 0.9}, r"generate: top_p applies only with do_sample: true"),
        ({"top_p": 1.5, "do_sample": True}, r"generate.top_p: Input should be less than or equal to 1"),
        ({"max_new_tokens": 0}, r"generate.max_new_tokens: Input should be greater than 0"),
        ({"beams": 4}, r"generate.beams: unknown key"),
    ],
)
def test_generate_settings_are_checked(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        generation_debug(tmp_path, generate=settings)


def test_generate_runs_first_only_when_the_section_is_there(tmp_path):
    assert pipeline_stages(generation_debug(tmp_path))[:2] == ("generate", "tokenize")
    assert "generate" not in pipeline_stages(generation_debug(tmp_path, generate=None))


def test_a_generate_setting_changes_every_fingerprint_and_the_eval_split_none_of_generates(tmp_path):
    config = generation_debug(tmp_path)
    planned = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    longer = generation_debug(tmp_path, **{"generate.max_new_tokens": 12})
    assert all(planned_fingerprint(longer, stage) != planned[stage] for stage in planned)
    fewer_eval = generation_debug(tmp_path, **{"data.eval.limit": 4})
    assert planned_fingerprint(fewer_eval, "generate") == planned["generate"]
    assert planned_fingerprint(fewer_eval, "tokenize") != planned["tokenize"]


def test_train_prompts_need_no_references_when_the_teacher_replaces_them(tmp_path):
    prompts_only = tmp_path / "prompts.jsonl"
    prompts_only.write_text(
        "".join(
            json.dumps({"dialogue": json.loads(line)["dialogue"]}) + "\n" for line in SAMSUM.read_text().splitlines()
        )
    )
    train = {"path": str(prompts_only), "prompt_template": TEMPLATE, "response_column": "summary"}
    config = generation_debug(tmp_path, **{"data.train": train})
    tokenizer = load_pipeline_tokenizer(config)
    assert check_data(config, tokenizer)["train"].good == 60
    keeping = generation_debug(tmp_path, **{"data.train": train, "generate.replace_references": False})
    with pytest.raises(ConfigError, match=r"data.train .*: missing column 'summary' \(named by the response column\)"):
        check_data(keeping, tokenizer)


# --- the fluency measures ---------------------------------------------------------------------


def test_distinct_2_counts_distinct_word_bigrams_over_all_outputs():
    # Bigrams: (a b) (b c) | (a b) (b d) -> 3 distinct of 4.
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["the the the the"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""], 2) == 0.0  # no output has two words
    assert distinct_n(["a b", "c d"], 1) == 1.0


@pytest.mark.parametrize(
    ("text", "repeated"),
    [
        ("the the the", True),
        ("ok ok", True),
        ("I am I am I am", True),
        ("I am I am I", True),  # cut at max_new_tokens after a whole word
        ("Amanda: Amanda: Aman", True),  # ... or inside one
        ("and a", True),  # as far as the text alone tells
        ("a b c a b c", True),
        ("a b c a b d", False),
        ("Amanda baked cookies for Jerry.", False),
        ("I am I", False),  # not said twice
        ("single", False),
        ("", False),
    ],
)
def test_an_output_that_is_one_repeated_ngram(text, repeated):
    assert is_one_repeated_ngram(text) is repeated


def test_an_output_that_ended_by_itself_must_end_on_a_whole_word_to_be_a_loop():
    assert not is_one_repeated_ngram("and a", cut=False) and not is_one_repeated_ngram(
        "Amanda: Amanda: Aman", cut=False
    )
    assert is_one_repeated_ngram("I am I am", cut=False) and is_one_repeated_ngram("ok ok ok", cut=False)


def test_fluency_scores_of_a_set_of_outputs():
    scores = fluency_scores(["the the the", "Amanda baked cookies", "yes yes"])
    assert scores == {"distinct_2": pytest.approx(4 / 5), "repeated_ngram_outputs": 2.0}


# --- the teacher's responses, without Ray -----------------------------------------------------


def test_batched_left_padded_responses_equal_one_prompt_at_a_time(tmp_path):
    config = generation_debug(tmp_path, **{"generate.max_new_tokens": 6})
    tokenizer = load_pipeline_tokenizer(config)
    lines = [json.loads(line) for line in SAMSUM.read_text().splitlines()[:4]]
    rows = pa.table(
        {"dialogue": [line["dialogue"] for line in lines], "example_id": pa.array([0, 1, 2, 3], pa.int64())}
    )
    task = config.task.model_copy(update={"prompt_template": TEMPLATE, "response_column": "summary"})
    budget = 96 - 7
    counted = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=counted.append))  # a RowCounter's handle, in-process
    answered = TeacherResponses(config, task, tokenizer, budget, counter)(rows)
    assert counted == [4]  # the prompts answered, for the driver's progress lines

    teacher = load_teacher(config)
    _, prompts = prompt_token_ids(rows.to_pydict(), tokenizer, task)
    assert len({len(prompt) for prompt in prompts}) > 1  # the batch really is padded
    expected = []
    for prompt in prompts:
        new = teacher.generate(
            torch.tensor([prompt[-budget:]]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, len(prompt[-budget:]) :].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        expected.append(tokenizer.decode(new, skip_special_tokens=True))
    assert answered.column("summary").to_pylist() == expected
    assert answered.column("source_example_id").to_pylist() == [0, 1, 2, 3]
    assert answered.column(_BLANK).to_pylist() == [not text.strip() for text in expected]  # the driver leaves them out
    assert set(answered.column("response_source").to_pylist()) == {"teacher"}


def test_kept_references_come_first_then_the_teachers_response(tmp_path):
    config = generation_debug(tmp_path, **{"generate.replace_references": False})
    tokenizer = load_pipeline_tokenizer(config)
    lines = [json.loads(line) for line in SAMSUM.read_text().splitlines()[:3]]
    rows = pa.table(
        {
            "dialogue": [line["dialogue"] for line in lines],
            "summary": [line["summary"] for line in lines],
            "example_id": pa.array([5, 6, 7], pa.int64()),
        }
    )
    task = config.task.model_copy(update={"prompt_template": TEMPLATE, "response_column": "summary"})
    answered = TeacherResponses(config, task, tokenizer, 80)(rows)
    sources = answered.column("response_source").to_pylist()
    data_rows = [i for i, origin in enumerate(sources) if origin == "data"]
    assert answered.take(data_rows).column("summary").to_pylist() == [line["summary"] for line in lines]
    assert answered.take(data_rows).column("source_example_id").to_pylist() == [5, 6, 7]
    for index in data_rows:  # each reference is followed by the teacher's answer to the same prompt, if not blank
        if index + 1 < answered.num_rows and sources[index + 1] == "teacher":
            assert answered["source_example_id"][index + 1] == answered["source_example_id"][index]


def test_blank_responses_are_left_out_and_a_kept_reference_stays(tmp_path):
    task = generation_debug(tmp_path).task.model_copy(
        update={"prompt_template": TEMPLATE, "response_column": "summary"}
    )
    rows = pa.table({"dialogue": ["a", "b", "c"], "summary": ["A", "B", "C"], "example_id": pa.array([0, 1, 2])})

    def written(batch: pa.Table) -> tuple[pa.Table, dict]:
        answered = SimpleNamespace(iter_batches=lambda **options: iter([batch]))
        counts = _write_responses(
            answered, task, tmp_path / "responses.parquet", drop_looping=True, drop_truncated=False
        )
        return pq.read_table(tmp_path / "responses.parquet"), counts

    replaced, counts = written(
        _response_rows(rows.drop_columns(["summary"]), task, ["x", " \n", ""], [1, 1, 0], [True, False, False], False)
    )
    assert replaced.column("summary").to_pylist() == ["x"] and replaced["source_example_id"].to_pylist() == [0]
    assert _response_counts(counts, drop_looping=True)["blank_responses"] == 2
    kept, counts = written(_response_rows(rows, task, ["x", " ", "z"], [1, 1, 1], [False] * 3, True))
    assert list(zip(kept["summary"].to_pylist(), kept["response_source"].to_pylist())) == [
        ("A", "data"),
        ("x", "teacher"),
        ("B", "data"),
        ("C", "data"),
        ("z", "teacher"),
    ]
    assert _response_counts(counts, drop_looping=True)["blank_responses"] == 1


def _written_beside_references(tmp_path, responses, lengths, cut, drop_looping, drop_truncated):
    """The file and counts ``_write_responses`` writes for the teacher's ``responses`` to four
    prompts, each kept reference ("A" to "D") before its response."""
    task = generation_debug(tmp_path).task.model_copy(
        update={"prompt_template": TEMPLATE, "response_column": "summary"}
    )
    rows = pa.table({"dialogue": [*"abcd"], "summary": [*"ABCD"], "example_id": pa.array([0, 1, 2, 3])})
    batch = _response_rows(rows, task, responses, lengths, cut, True)
    answered = SimpleNamespace(iter_batches=lambda **options: iter([batch]))
    written = _write_responses(answered, task, tmp_path / "responses.parquet", drop_looping, drop_truncated)
    return pq.read_table(tmp_path / "responses.parquet"), written


@pytest.mark.parametrize("drop_looping", [True, False])
def test_looping_responses_are_counted_and_left_out_unless_kept(tmp_path, drop_looping):
    # Row 1's reference "B" stays: only the teacher's responses are judged. Row 2's "and a" ended
    # by itself (not cut at max_new_tokens), so its last word is whole: no loop. Row 3's is blank.
    responses = ["Amanda bakes.", "go on go on go", "and a", ""]
    kept, written = _written_beside_references(
        tmp_path, responses, [3, 5, 2, 0], [False, True, False, False], drop_looping, drop_truncated=False
    )
    expected = ["A", "Amanda bakes.", "B", "go on go on go", "C", "and a", "D"]
    if drop_looping:
        expected.remove("go on go on go")
    assert kept["summary"].to_pylist() == expected
    assert kept.column_names == ["dialogue", "summary", "response_source", "source_example_id"]
    assert written["response_tokens"] == (5 if drop_looping else 10)
    assert ("go on go on go" in written["first_responses"]) is not drop_looping
    # Of the 4 prompts: 1 blank, 1 looping (left out or kept), whichever way the loop went; the
    # truncated are counted among the responses written (the loop was the one cut).
    counts = _response_counts(written, drop_looping)
    assert counts == {
        "rows": len(expected),
        "blank_responses": 1,
        "looping_responses": 1,
        "truncated_responses": 0 if drop_looping else 1,
    }


def test_responses_cut_at_max_new_tokens_are_left_out_with_drop_truncated(tmp_path):
    # Rows 1 and 3 reached max_new_tokens; row 3's is also a loop, left out as one (and not
    # counted as cut). The references stay: they are never cut.
    responses = ["Amanda bakes.", "Jerry will get some of the", "They meet.", "go on go on go"]
    kept, written = _written_beside_references(
        tmp_path, responses, [3, 6, 2, 5], [False, True, False, True], drop_looping=True, drop_truncated=True
    )
    assert kept["summary"].to_pylist() == ["A", "Amanda bakes.", "B", "C", "They meet.", "D"]
    assert written["response_tokens"] == 5 and written["first_responses"] == ["Amanda bakes.", "They meet."]
    assert _response_counts(written, drop_looping=True) == {
        "rows": 6,
        "blank_responses": 0,
        "looping_responses": 1,
        "truncated_responses": 1,
    }


def test_too_few_responses_left_stop_the_stage_naming_what_was_left_out():
    settings = GenerateConfig(drop_looping=True, drop_truncated=True)
    counts = {"rows": 0, "blank_responses": 0, "looping_responses": 2, "truncated_responses": 22}
    assert _too_few_responses(counts, settings, 24, workers=2, share=4) == (
        "generate: the teacher's responses to all 24 prompts of data.train are one n-gram repeated or cut at "
        "generate.max_new_tokens; nothing is left to train on"
    )
    counts = {"rows": 7, "blank_responses": 1, "looping_responses": 0, "truncated_responses": 16}
    assert _too_few_responses(counts, settings, 24, workers=2, share=4) == (
        "generate: 7 rows are left of the teacher's responses to 24 prompts of data.train (those blank or cut at "
        "generate.max_new_tokens left out), too few to give each of 2 workers (resources.num_workers) the 4 it "
        "trains on per batch; use more prompts or fewer workers"
    )
    assert _too_few_responses(counts | {"rows": 8}, settings, 24, workers=2, share=4) is None
    # Kept responses are not named as left out.
    kept = GenerateConfig(drop_looping=False)
    assert "repeated" not in _too_few_responses(counts | {"looping_responses": 3}, kept, 24, workers=2, share=4)


def test_a_teacher_whose_every_response_is_blank_stops_the_stage_in_one_line(tmp_path, local_ray):
    """A teacher with a zeroed final norm gives all-zero logits, so greedy decoding picks token 0
    (<|endoftext|>, a special token) at every step: every response decodes to blank text."""
    random = generation_debug(tmp_path)
    teacher = load_teacher(random)
    with torch.no_grad():
        teacher.model.norm.weight.zero_()
    teacher.save_pretrained(tmp_path / "mute-teacher")
    load_pipeline_tokenizer(random).save_pretrained(tmp_path / "mute-teacher")
    config = generation_debug(
        tmp_path, **{"teacher": {"source": "hf", "path": str(tmp_path / "mute-teacher"), "architecture": None}}
    )
    with pytest.raises(StageError) as raised:
        run_pipeline(config, stages=("generate",))
    message = str(raised.value)
    assert message == (
        "generate: the teacher's responses to all 24 prompts of data.train are blank; nothing is left to train on"
    )
    assert not [path for path in tmp_path.rglob("manifest.json") if "generate" in path.parts]  # not done: reruns


def test_sampled_responses_are_seeded_per_batch(tmp_path):
    config = generation_debug(
        tmp_path, generate={"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 3}
    )
    tokenizer = load_pipeline_tokenizer(config)
    lines = [json.loads(line) for line in SAMSUM.read_text().splitlines()[:4]]
    rows = pa.table(
        {"dialogue": [line["dialogue"] for line in lines], "example_id": pa.array([0, 1, 2, 3], pa.int64())}
    )
    task = config.task.model_copy(update={"prompt_template": TEMPLATE, "response_column": "summary"})
    first = TeacherResponses(config, task, tokenizer, 80)(rows)
    torch.manual_seed(12345)  # the global generator's state must not matter
    again = TeacherResponses(config, task, tokenizer, 80)(rows)
    reseeded = generation_debug(
        tmp_path, generate={"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 4}
    )
    other = TeacherResponses(reseeded, task, tokenizer, 80)(rows)
    assert first.column("summary").to_pylist() == again.column("summary").to_pylist()
    assert first.column("summary").to_pylist() != other.column("summary").to_pylist()


# --- the pipeline -----------------------------------------------------------------------------


TRAINING_STAGES = ("generate", "tokenize", "score", "distill")


@pytest.mark.integration  # generate to distill, once more (all reused), then generate and tokenize again: 3-5 min
def test_the_student_trains_on_the_teachers_responses_and_generate_is_reused(tmp_path, local_ray):
    config = generation_debug(tmp_path)
    result = run_pipeline(config, stages=TRAINING_STAGES)
    assert tuple(result.stages) == TRAINING_STAGES and not any(r.cached for r in result.stages.values())

    generated = result.stages["generate"]
    responses = pq.read_table(generated.directory / GENERATED_TRAIN_FILE)
    assert generated.outputs["rows"] == responses.num_rows > 0
    outputs = generated.outputs
    assert outputs["prompts"] == 24 == responses.num_rows + outputs["blank_responses"] + outputs["looping_responses"]
    references = [json.loads(line)["summary"] for line in SAMSUM.read_text().splitlines()[:24]]
    assert not set(responses.column("summary").to_pylist()) & set(references)
    # tokenize's train rows (and the score rows, which default to them) hold the teacher's responses.
    tokenized = result.stages["tokenize"].directory
    for split in ("train", "score"):
        rows = pq.read_table(tokenized / split)
        assert rows.column("reference").to_pylist() == responses.column("summary").to_pylist()
    evaluated = pq.read_table(tokenized / "eval").column("reference").to_pylist()
    assert evaluated == references[:8]  # eval keeps the data's references
    assert json.loads((result.stages["distill"].directory / "metrics.json").read_text())["steps"] == 4

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(generated.run_id)
    assert run.data.params["generate.max_new_tokens"] == "8" and run.data.metrics["rows"] == responses.num_rows
    assert "responses.json" in [item.path for item in client.list_artifacts(generated.run_id)]
    mlflow.set_tracking_uri(result.tracking_uri)
    table = mlflow.load_table("responses.json", run_ids=[generated.run_id])
    assert table["summary"].tolist() == responses.column("summary").to_pylist()[:20]

    again = run_pipeline(config, stages=TRAINING_STAGES)
    assert all(record.cached for record in again.stages.values())
    longer_config = generation_debug(tmp_path, **{"generate.max_new_tokens": 12})
    longer = run_pipeline(longer_config, stages=("generate", "tokenize"))
    assert not any(record.cached for record in longer.stages.values())
    assert longer.stages["generate"].outputs["mean_response_tokens"] > generated.outputs["mean_response_tokens"]
    assert planned_fingerprint(longer_config, "distill") != result.stages["distill"].fingerprint


@pytest.mark.parametrize(
    ("replace_references", "rows", "refused"), [(True, 6, True), (False, 6, False), (False, 3, True)]
)
def test_too_few_train_prompts_for_a_batch_are_refused_unless_the_references_may_fill_it(
    tmp_path, replace_references, rows, refused
):
    """Keeping the references, distill gets each reference and the teacher's response: up to twice the rows."""
    split = {"path": str(SAMSUM), "prompt_template": TEMPLATE, "response_column": "summary", "limit": rows}
    config = generation_debug(
        tmp_path, **{"data.train": split, "generate.replace_references": replace_references, "training.batch_size": 8}
    )
    if refused:
        with pytest.raises(ConfigError, match=rf"data.train .*: {rows} rows cannot give each of 1 workers"):
            check_data(config, load_pipeline_tokenizer(config))
    else:
        assert check_data(config, load_pipeline_tokenizer(config))["train"].good == rows
