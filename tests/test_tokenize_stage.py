"""The tokenize stage through a real local Ray: formats, masks, stable ids, one-line errors.

Each tokenized split starts a tokenizer actor pool (seconds on a small machine), so the tests
spread the formats over the splits of a few runs instead of one run per format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from flexkd.config.schema import PipelineConfig, parse_config
from flexkd.data.rows import IGNORE_INDEX
from flexkd.errors import StageError
from flexkd.models.loading import TINY_TOKENIZER_DIR, load_tokenizer
from flexkd.stages import tokenize as tokenize_stage

SAMPLES = Path(__file__).resolve().parents[1] / "flexkd" / "assets" / "samples"
SST2_TASK = {
    "kind": "classification",
    "prompt_template": "Review: {sentence}\nSentiment:",
    "label_column": "label",
    "label_names": ["negative", "positive"],
}
SAMSUM_TASK = {
    "kind": "generation",
    "prompt_template": "Summarize the dialogue:\n{dialogue}\nSummary:",
    "response_column": "summary",
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    already_up = ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR")
    yield
    if not already_up:
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def make_config(
    task: dict[str, Any], train: Path | dict, eval_: Path | dict, score: Path | dict | None = None, **data: Any
) -> PipelineConfig:
    """A pipeline over the tiny tokenizer; a split is a path, or a DataSplit mapping."""
    splits = {
        name: {"path": str(split)} if isinstance(split, Path) else {**split, "path": str(split["path"])}
        for name, split in {"train": train, "eval": eval_, "score": score}.items()
        if split is not None
    }
    return parse_config(
        {
            "name": "tokenize-test",
            "teacher": {
                "source": "random",
                "tokenizer": str(TINY_TOKENIZER_DIR),
                "architecture": {
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "intermediate_size": 128,
                },
            },
            "data": {**splits, "max_length": 96, "shard_rows": 256, **data},
            "task": task,
        }
    )


def read_split(directory: Path) -> dict[str, list]:
    """All rows of one split, in example_id order."""
    table = pq.read_table(directory).sort_by("example_id")
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    return table.to_pydict()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration  # four tokenize runs, 36 s: the fast tier stays under 10 min
def test_sst2_from_jsonl_tsv_and_a_saved_dataset(tmp_path, tokenizer, capfd):
    import datasets

    test_rows = read_jsonl(SAMPLES / "sst2_test.jsonl")
    test_rows[0]["sentence"] = '"quoted" ' + test_rows[0]["sentence"]  # an unquoted TSV keeps the '"'
    tsv_lines = [f"{row['sentence']}\t{row['label']}\n" for row in test_rows]
    (tmp_path / "test.tsv").write_text("sentence\tlabel\n" + "".join(tsv_lines))
    names = ["negative", "positive"]
    datasets.Dataset.from_list(
        [{"sentence": r["sentence"], "label": names[r["label"]]} for r in test_rows]
    ).save_to_disk(tmp_path / "saved")
    config = make_config(SST2_TASK, SAMPLES / "sst2_train.jsonl", tmp_path / "test.tsv", score=tmp_path / "saved")
    outputs = tokenize_stage.run(config, {}, tmp_path / "out")

    assert outputs["rows"] == {"train": 1000, "eval": 200, "score": 200}
    assert outputs["pad_token_id"] == tokenizer.pad_token_id and len(outputs["verbalizer_ids"]) == 2
    assert json.loads(json.dumps(outputs)) == outputs
    assert len(list((tmp_path / "out" / "train").glob("*.parquet"))) >= 3  # ~shard_rows rows per file

    train = read_split(tmp_path / "out" / "train")
    train_rows = read_jsonl(SAMPLES / "sst2_train.jsonl")
    assert train["example_id"] == list(range(1000))
    assert train["class_label"] == [row["label"] for row in train_rows]
    assert train["input_ids"][5] == tokenizer(f"Review: {train_rows[5]['sentence']}\nSentiment:")["input_ids"]
    assert train["prompt_length"] == [len(ids) for ids in train["input_ids"]]
    assert all(label == IGNORE_INDEX for labels in train["labels"] for label in labels)
    assert outputs["tokens"]["train"] == sum(map(len, train["input_ids"]))

    evaluation = read_split(tmp_path / "out" / "eval")
    assert evaluation["example_id"] == list(range(200))
    assert evaluation["class_label"] == [row["label"] for row in test_rows]
    assert tokenizer.decode(evaluation["input_ids"][0]) == f"Review: {test_rows[0]['sentence']}\nSentiment:"
    assert read_split(tmp_path / "out" / "score") == evaluation  # label names map to the same rows
    # Ray prints an error-looking line for a restartable actor made from object-store arguments.
    assert "constructor arguments in the object store" not in capfd.readouterr().err


@pytest.mark.integration  # 53 s: the fast tier stays under 10 min
def test_samsum_masks_prompts_numbers_across_files_and_reruns_identically(tmp_path, tokenizer):
    source = read_jsonl(SAMPLES / "samsum.jsonl")
    parquet_dir = tmp_path / "eval_parquet"  # four-row files: the limit and the ids span files
    parquet_dir.mkdir()
    for part, start in enumerate(range(0, 20, 4)):
        pq.write_table(pa.Table.from_pylist(source[start : start + 4]), parquet_dir / f"part-{part:02d}.parquet")
    # The eval split brings its own prompt template, as an instruction-tuned pipeline's does.
    eval_split = {"path": parquet_dir, "limit": 10, "prompt_template": "Dialogue:\n{dialogue}\nTL;DR:"}
    config = make_config(SAMSUM_TASK, SAMPLES / "samsum.jsonl", eval_split, max_length=128)
    first = tokenize_stage.run(config, {}, tmp_path / "first")
    assert first["rows"] == {"train": 60, "eval": 10, "score": 60} and first["verbalizer_ids"] is None

    train = read_split(tmp_path / "first" / "train")
    assert train["example_id"] == list(range(60))
    assert train["reference"] == [row["summary"] for row in source]
    for ids, labels, prompt_length in zip(train["input_ids"], train["labels"], train["prompt_length"]):
        assert len(ids) <= 128 and 0 < prompt_length < len(ids)
        assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
        assert labels[prompt_length:] == ids[prompt_length:]
    assert set(train["class_label"]) == {-1}
    # score defaults to the train source and is written as its own folder.
    assert read_split(tmp_path / "first" / "score") == train
    evaluation = read_split(tmp_path / "first" / "eval")
    assert evaluation["example_id"] == list(range(10))
    assert evaluation["reference"] == [row["summary"] for row in source[:10]]
    first_prompt = evaluation["input_ids"][0][: evaluation["prompt_length"][0]]
    assert tokenizer.decode(first_prompt) == f"Dialogue:\n{source[0]['dialogue']}\nTL;DR:"

    second = tokenize_stage.run(config, {}, tmp_path / "second")
    assert second == first
    for split in ("train", "eval", "score"):
        assert read_split(tmp_path / "second" / split) == read_split(tmp_path / "first" / split)


def _one_line_error(config: PipelineConfig, output_dir: Path) -> str:
    with pytest.raises(StageError) as caught:
        tokenize_stage.run(config, {}, output_dir)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("tokenize: ")
    return message


def test_a_missing_column_names_the_split_and_the_columns(tmp_path):
    pq.write_table(pa.table({"text": ["fine"], "label": [1]}), tmp_path / "eval.parquet")
    config = make_config(SST2_TASK, SAMPLES / "sst2_train.jsonl", tmp_path / "eval.parquet")
    message = _one_line_error(config, tmp_path / "out")
    assert message == (
        f"tokenize: data.eval ({tmp_path / 'eval.parquet'}): missing column 'sentence' (named by the prompt template); "
        "columns are: text, label"
    )
    assert not (tmp_path / "out" / "train").exists()  # checked before any split was tokenized


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n"], ids=["empty", "header-only"])
def test_an_empty_file_is_refused(tmp_path, content):
    (tmp_path / "train.tsv").write_text(content)
    message = _one_line_error(make_config(SST2_TASK, tmp_path / "train.tsv", SAMPLES / "sst2_test.jsonl"), tmp_path)
    assert message == f"tokenize: data.train ({tmp_path / 'train.tsv'}): the split is empty"


def test_a_malformed_file_is_one_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"sentence": "fine", "label": 1}\n{"sentence": "cut')
    message = _one_line_error(make_config(SST2_TASK, tmp_path / "broken.jsonl", SAMPLES / "sst2_test.jsonl"), tmp_path)
    assert message.startswith(f"tokenize: data.train ({tmp_path / 'broken.jsonl'}): JSON parse error")


def test_a_missing_file_is_refused(tmp_path):
    message = _one_line_error(make_config(SST2_TASK, SAMPLES / "sst2_train.jsonl", tmp_path / "nope.jsonl"), tmp_path)
    assert message == f"tokenize: data.eval ({tmp_path / 'nope.jsonl'}): file not found"


def test_a_label_outside_the_label_set_is_one_line_naming_the_row_and_the_count(tmp_path):
    (tmp_path / "bad.jsonl").write_text(
        "".join(json.dumps({"sentence": f"s{i}", "label": 7 if i in (40, 50) else 1}) + "\n" for i in range(60))
    )
    message = _one_line_error(make_config(SST2_TASK, tmp_path / "bad.jsonl", SAMPLES / "sst2_test.jsonl"), tmp_path)
    assert message == (
        f"tokenize: data.train ({tmp_path / 'bad.jsonl'}): row 40, column 'label': "
        "label 7 is not in the label set 0..1 / negative, positive; 2 of 60 rows are bad; "
        "fix them, or set data.on_bad_rows: skip"
    )
    assert not (tmp_path / "train").exists()  # refused before any split was tokenized


def test_a_tsv_byte_that_is_not_utf8_is_refused_or_its_row_skipped_never_read_as_binary(tmp_path, tokenizer):
    """The user's report: one bad byte made pyarrow read the whole column as binary, and every
    prompt became "Review: b'...'". Now the row is named; with on_bad_rows: skip the Ray Data
    read tasks leave it out and every other row is tokenized from its text."""
    sentences = [f"sentence number {i}" for i in range(30)]
    lines = [f"{text}\t{i % 2}\n".encode() for i, text in enumerate(sentences)]
    lines[7] = b"caf\xe9 au lait\t1\n"  # Latin-1, not UTF-8
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\n" + b"".join(lines))
    config = make_config(SST2_TASK, tmp_path / "train.tsv", SAMPLES / "sst2_test.jsonl")
    assert _one_line_error(config, tmp_path / "refused") == (
        f"tokenize: data.train ({tmp_path / 'train.tsv'}): row 7, column 'sentence': not valid UTF-8 "
        "(byte 0xe9 at offset 3); 1 of 30 rows are bad; fix them, or set data.on_bad_rows: skip"
    )

    skipping = make_config(SST2_TASK, tmp_path / "train.tsv", SAMPLES / "sst2_test.jsonl", on_bad_rows="skip")
    outputs = tokenize_stage.run(skipping, {}, tmp_path / "out")
    assert outputs["rows"]["train"] == 29 and outputs["bad_rows_skipped"] == {"train": 1, "eval": 0, "score": 1}
    train = read_split(tmp_path / "out" / "train")
    assert train["example_id"] == [i for i in range(30) if i != 7]  # the others keep their ids
    kept = [text for i, text in enumerate(sentences) if i != 7]
    assert [tokenizer.decode(ids) for ids in train["input_ids"]] == [f"Review: {t}\nSentiment:" for t in kept]
    assert train["class_label"] == [i % 2 for i in range(30) if i != 7]  # TSV labels are the strings "0", "1"
