"""flexkd.data: verbalizers, prompt rendering, truncation, label errors, collation, reading sources as text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from flexkd.config.schema import TaskConfig
from flexkd.data.rows import (
    IGNORE_INDEX,
    _truncate_generation,
    class_index,
    collate_batch,
    continuation_ids,
    render_prompt,
    required_columns,
    template_columns,
    tokenize_rows,
    verbalizer_token_ids,
)
from flexkd.data.sources import DataError, RowRules, batch_readers, read_checked, scan_source
from flexkd.method.losses import UNLABELED

SST2_TASK = TaskConfig(
    kind="classification",
    prompt_template="Review: {sentence}\nSentiment:",
    label_column="label",
    label_names=["negative", "positive"],
)
SAMSUM_TASK = TaskConfig(
    kind="generation", prompt_template="Summarize the dialogue:\n{dialogue}\nSummary:", response_column="summary"
)


def test_verbalizers_are_the_first_token_after_a_space(tiny_tokenizer):
    ids = verbalizer_token_ids(tiny_tokenizer, ["negative", "positive"])
    assert ids == [
        continuation_ids(tiny_tokenizer, [" negative"])[0][0],
        continuation_ids(tiny_tokenizer, [" positive"])[0][0],
    ]
    assert tiny_tokenizer.decode(ids[1]).startswith(" p")
    # A name that already starts with whitespace is taken as is, not given a second space.
    assert verbalizer_token_ids(tiny_tokenizer, [" negative", " positive"]) == ids


def test_verbalizers_sharing_a_first_token_are_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="task.label_names: 'positive' and 'pos'") as caught:
        verbalizer_token_ids(tiny_tokenizer, ["positive", "negative", "pos"])
    assert "\n" not in str(caught.value)


def test_render_prompt_formats_columns_and_names_a_missing_one(tiny_tokenizer):
    assert (
        render_prompt("Review: {sentence}\nSentiment:", {"sentence": "great"}, tiny_tokenizer, False)
        == "Review: great\nSentiment:"
    )
    with pytest.raises(ValueError, match=r"task.prompt_template: no column 'text' in the row; columns are: sentence"):
        render_prompt("{text}", {"sentence": "great"}, tiny_tokenizer, False)


def test_render_prompt_wraps_one_user_message_in_the_chat_template(tiny_tokenizer):
    rendered = render_prompt("Say {word}", {"word": "hi"}, tiny_tokenizer, chat_template=True)
    assert rendered == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template", ["{text.__class__}", "{0}", "{}", "{text[0]}"])
def test_templates_may_only_name_columns(template):
    with pytest.raises(ValueError, match="task.prompt_template"):
        template_columns(template)


def test_a_template_that_names_no_column_is_refused():
    """Every row would get the same prompt: a model trained on it learns nothing from the data."""
    with pytest.raises(ValueError, match=r"^task.prompt_template: 'Sentiment:' names no column"):
        template_columns("Sentiment:")


def test_required_columns_are_the_template_columns_and_the_target():
    assert required_columns(SST2_TASK) == ["sentence", "label"]
    assert required_columns(SAMSUM_TASK) == ["dialogue", "summary"]


def test_classification_rows_mask_everything_and_map_labels(tiny_tokenizer):
    batch = {
        "sentence": np.array(["a gem", "a dud"], dtype=object),
        "label": ["positive", 0],
        "example_id": np.array([7, 8]),
    }
    rows = tokenize_rows(batch, tiny_tokenizer, SST2_TASK, max_length=64)
    assert rows["example_id"] == [7, 8]
    assert rows["class_label"] == [1, 0] and rows["reference"] == ["positive", "negative"]
    expected = tiny_tokenizer("Review: a gem\nSentiment:")["input_ids"]
    assert rows["input_ids"][0] == expected
    assert rows["prompt_length"][0] == len(expected)
    assert all(label == IGNORE_INDEX for labels in rows["labels"] for label in labels)


def test_unlabeled_transfer_rows_never_read_a_label(tiny_tokenizer):
    assert required_columns(SST2_TASK, labeled=False) == ["sentence"]
    without = {"sentence": np.array(["a gem", "a dud"], dtype=object), "example_id": np.array([3, 4])}
    # Labels a labeled row would be refused for: an unlabeled row must not even look at them.
    with_bad_labels = without | {"label": ["banana", None]}
    for batch in (without, with_bad_labels):
        rows = tokenize_rows(batch, tiny_tokenizer, SST2_TASK, max_length=64, labeled=False)
        assert rows["class_label"] == [UNLABELED, UNLABELED] and rows["reference"] == ["", ""]
        assert rows["example_id"] == [3, 4]
        assert rows["input_ids"][0] == tiny_tokenizer("Review: a gem\nSentiment:")["input_ids"]
        assert all(label == IGNORE_INDEX for labels in rows["labels"] for label in labels)
    with pytest.raises(ValueError, match="label"):
        tokenize_rows(with_bad_labels, tiny_tokenizer, SST2_TASK, max_length=64)  # labeled: refused
    with pytest.raises(ValueError, match="'classification' only"):
        tokenize_rows({"dialogue": ["hi"]}, tiny_tokenizer, SAMSUM_TASK, max_length=64, labeled=False)


def test_classification_prompts_keep_their_end(tiny_tokenizer):
    batch = {"sentence": ["a long and winding review of a film " * 5], "label": [1]}
    full = tiny_tokenizer("Review: " + batch["sentence"][0] + "\nSentiment:")["input_ids"]
    rows = tokenize_rows(batch, tiny_tokenizer, SST2_TASK, max_length=12)
    assert rows["input_ids"][0] == full[-12:] and rows["prompt_length"] == [12]


@pytest.mark.parametrize("bad", [2, -1, "neutral", 1.5, True])
def test_a_label_outside_the_label_set_is_one_line_naming_it(tiny_tokenizer, bad):
    allowed = "is not in the label set 0..1 / negative, positive"
    with pytest.raises(ValueError, match=rf"^example 0: .*label .* {allowed}") as caught:
        tokenize_rows({"sentence": ["fine"], "label": [bad]}, tiny_tokenizer, SST2_TASK, max_length=32)
    assert repr(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_a_null_value_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="example 4: column 'sentence' is empty"):
        tokenize_rows(
            {"sentence": ["ok", None], "label": [1, 1], "example_id": [3, 4]}, tiny_tokenizer, SST2_TASK, max_length=32
        )


def test_an_empty_prompt_is_refused(tiny_tokenizer):
    task = SST2_TASK.model_copy(update={"prompt_template": "{sentence}"})
    with pytest.raises(ValueError, match="example 0: the prompt has no tokens"):
        tokenize_rows({"sentence": [""], "label": [1]}, tiny_tokenizer, task, max_length=32)


def test_generation_rows_mask_the_prompt_and_end_with_eos(tiny_tokenizer):
    batch = {"dialogue": ["A: hi\nB: hello"], "summary": ["A greets B."]}
    rows = tokenize_rows(batch, tiny_tokenizer, SAMSUM_TASK, max_length=128)
    ids, labels, prompt_length = rows["input_ids"][0], rows["labels"][0], rows["prompt_length"][0]
    assert ids[:prompt_length] == tiny_tokenizer("Summarize the dialogue:\nA: hi\nB: hello\nSummary:")["input_ids"]
    assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert labels[prompt_length:] == ids[prompt_length:]
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[prompt_length:-1]) == " A greets B."
    assert rows["class_label"] == [-1] and rows["reference"] == ["A greets B."]


def test_generation_responses_after_a_chat_template_get_no_extra_space(tiny_tokenizer):
    task = SAMSUM_TASK.model_copy(update={"chat_template": True})
    rows = tokenize_rows({"dialogue": ["A: hi"], "summary": ["A greets."]}, tiny_tokenizer, task, max_length=128)
    prompt_length = rows["prompt_length"][0]
    assert tiny_tokenizer.decode(rows["input_ids"][0][prompt_length:-1]) == "A greets."


@pytest.mark.parametrize(
    ("prompt", "response", "max_length", "kept_prompt", "kept_response"),
    [
        (10, 3, 8, 5, 3),  # short response: all of it survives, the prompt loses its start
        (10, 20, 8, 4, 4),  # both long: the response keeps max_length // 2, cut at its end
        (2, 20, 8, 2, 6),  # short prompt: untouched, the response fills the rest
        (3, 3, 8, 3, 3),  # fits: nothing cut
    ],
)
def test_generation_truncation(prompt, response, max_length, kept_prompt, kept_response):
    prompt_ids, response_ids = list(range(100, 100 + prompt)), list(range(response))
    kept_p, kept_r = _truncate_generation(prompt_ids, response_ids, max_length)
    assert kept_p == prompt_ids[len(prompt_ids) - kept_prompt :] and kept_r == response_ids[:kept_response]


def test_truncated_generation_rows_fit_max_length(tiny_tokenizer):
    batch = {"dialogue": ["A: hi there, how are you doing today? " * 10], "summary": ["They talk. " * 10]}
    rows = tokenize_rows(batch, tiny_tokenizer, SAMSUM_TASK, max_length=32)
    assert len(rows["input_ids"][0]) == 32 and rows["prompt_length"] == [16]
    assert rows["input_ids"][0][-1] != tiny_tokenizer.eos_token_id  # the response was cut: no eos


def _ray_style(rows: list[list[int]]) -> np.ndarray:
    column = np.empty(len(rows), dtype=object)
    column[:] = [np.asarray(row, dtype=np.int32) for row in rows]
    return column


@pytest.mark.parametrize("as_column", [_ray_style, lambda rows: rows])
def test_collate_pads_to_the_longest_row(as_column):
    rows = {
        "input_ids": as_column([[5, 6, 7], [8]]),
        "labels": as_column([[-100, 6, 7], [-100]]),
        "prompt_length": np.array([1, 1], dtype=np.int32),
        "class_label": [-1, -1],
        "example_id": [3, 4],
    }
    batch = collate_batch(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["example_id"].tolist() == [3, 4] and batch["prompt_length"].tolist() == [1, 1]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collate_accepts_equal_length_rows_as_a_2d_array():
    rows = {
        "input_ids": np.array([[1, 2], [3, 4]], dtype=np.int32),
        "labels": np.full((2, 2), -100),
        "prompt_length": [2, 2],
        "class_label": [0, 1],
        "example_id": [0, 1],
    }
    batch = collate_batch(rows, pad_token_id=9)
    assert batch["input_ids"].shape == (2, 2) and batch["attention_mask"].all()
    assert batch["class_label"].tolist() == [0, 1]


def test_a_label_may_be_its_index_as_a_decimal_string():
    """TSV and CSV labels are read as strings: "1" is index 1 unless it is itself a label name."""
    assert class_index("1", ["negative", "positive"], "label") == 1
    assert class_index("1", ["1", "0"], "label") == 0
    with pytest.raises(ValueError, match="label '2' is not in the label set"):
        class_index("2", ["negative", "positive"], "label")


def test_tsv_columns_are_read_as_text_never_as_numbers_or_bytes(tmp_path):
    (tmp_path / "x.tsv").write_bytes(b"sentence\tlabel\n007\t1\n1.50\t0\ncaf\xc3\xa9\t1\n")
    rules = RowRules.for_task(SST2_TASK)
    ((read, first_id),) = batch_readers(str(tmp_path / "x.tsv"))
    rows = pa.concat_tables(read_checked(read, first_id, rules)).to_pydict()
    assert rows == {"sentence": ["007", "1.50", "café"], "label": ["1", "0", "1"], "example_id": [0, 1, 2]}


def test_a_generation_row_needs_a_response(tmp_path):
    (tmp_path / "x.jsonl").write_text(
        '{"dialogue": "A: hi", "summary": "A greets."}\n{"dialogue": "B: yo", "summary": ""}\n'
    )
    summary = scan_source(str(tmp_path / "x.jsonl"), RowRules.for_task(SAMSUM_TASK))
    assert (summary.good, summary.bad, str(summary.first_bad)) == (1, 1, "row 1, column 'summary': empty text")


def test_a_json_array_of_objects_reads_like_json_lines(tmp_path):
    """Alpaca's data.json shape; a key missing from a row is a null there, and so a bad row."""
    (tmp_path / "x.json").write_text(
        ' [{"dialogue": "A: hi", "summary": "A greets."},\n'
        ' {"dialogue": "B: yo", "summary": "B greets.", "id": 7},\n'
        ' {"dialogue": "C: hey"}]'
    )
    rules = RowRules.for_task(SAMSUM_TASK)
    summary = scan_source(str(tmp_path / "x.json"), rules)
    assert (summary.good, summary.bad, str(summary.first_bad)) == (2, 1, "row 2, column 'summary': empty (null)")
    ((read, first_id),) = batch_readers(str(tmp_path / "x.json"))
    rows = pa.concat_tables(read_checked(read, first_id, rules)).to_pydict()
    assert rows == {"dialogue": ["A: hi", "B: yo"], "summary": ["A greets.", "B greets."], "example_id": [0, 1]}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('[{"dialogue": "A: hi", "summary": "x"}, "B: yo"]', "row 1: not a JSON object"),
        ('[{"dialogue": "A: hi", "summary": "x"}, {"dialogue": 3.5, "summary": "y"}]', "a column mixes types"),
        ('[{"dialogue": "A: hi", "summary": "x"},]', "JSON parse error: Expecting value: line 1 column 40"),
        ('[{"dialogue": "A: hi", "summary": "x", "meta": ["caf\xe9"]}]', "a key or a nested value is not UTF-8"),
        ('[{"dialogue": "A: hi", "summary": "x", "id": 99999999999999999999}]', "a number does not fit in 64 bits"),
    ],
)
def test_a_json_array_that_is_not_rows_is_one_line(tmp_path, content, reason):
    (tmp_path / "x.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError) as error:
        scan_source(str(tmp_path / "x.json"), RowRules.for_task(SAMSUM_TASK))
    assert str(error.value).startswith(reason) and "\n" not in str(error.value)


def test_a_json_array_after_much_whitespace_and_an_escaped_lone_surrogate_is_a_bad_row(tmp_path):
    """The surrogate is valid JSON text but not UTF-8: one bad row, named, as a stray byte is."""
    rows = '{"dialogue": "A: hi", "summary": "x"}, {"dialogue": "B: \\ud800", "summary": "y"}'
    (tmp_path / "x.json").write_text(" " * 5000 + f"[{rows}]")
    summary = scan_source(str(tmp_path / "x.json"), RowRules.for_task(SAMSUM_TASK))
    assert (summary.good, summary.bad) == (1, 1)
    assert str(summary.first_bad).startswith("row 1, column 'dialogue': not valid UTF-8")


@pytest.mark.parametrize("name", ["x.jsonl.gz", "x.json.bz2", "x.tsv.zst", "x.csv.gz"])
def test_a_compressed_text_file_reads_as_the_file_inside(tmp_path, name):
    """Hub datasets often ship train.jsonl.gz; pyarrow decompresses by the last suffix."""
    text = {
        ".jsonl": '{"sentence": "fine", "label": 1}\n{"sentence": "dull", "label": 0}\n',
        ".json": '[{"sentence": "fine", "label": 1}, {"sentence": "dull", "label": 0}]',
        ".tsv": "sentence\tlabel\nfine\t1\ndull\t0\n",
        ".csv": "sentence,label\nfine,1\ndull,0\n",
    }[Path(Path(name).stem).suffix]
    codec = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}[Path(name).suffix]
    with pa.output_stream(str(tmp_path / name), compression=codec) as stream:
        stream.write(text.encode())
    ((read, first_id),) = batch_readers(str(tmp_path / name))
    rows = pa.concat_tables(read_checked(read, first_id, RowRules.for_task(SST2_TASK))).to_pydict()
    assert rows["sentence"] == ["fine", "dull"] and [str(label) for label in rows["label"]] == ["1", "0"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("x.parquet.gz", b"PAR1", "unsupported format '.parquet.gz'"),
        ("x.gz", b"\x1f\x8b", "unsupported format '.gz'"),
        ("x.jsonl", b"\n \n", "the split is empty"),  # blank lines, as an empty file
    ],
)
def test_what_cannot_be_read_inside_a_compressed_or_blank_file_is_one_line(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        scan_source(str(tmp_path / name), RowRules.for_task(SST2_TASK))
    assert str(error.value).startswith(reason) and "\n" not in str(error.value)


def test_a_dataset_dict_folder_is_refused_naming_its_splits(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"sentence": ["fine", "dull"], "label": [1, 0]})
    datasets.DatasetDict({"train": rows, "validation": rows}).save_to_disk(str(tmp_path / "sst2"))
    with pytest.raises(DataError, match=r"^a datasets DatasetDict; .* split folders: train, validation$"):
        batch_readers(str(tmp_path / "sst2"))
    ((read, first_id),) = batch_readers(str(tmp_path / "sst2" / "train"))
    assert pa.concat_tables(read_checked(read, first_id, RowRules.for_task(SST2_TASK)))["sentence"].to_pylist() == [
        "fine",
        "dull",
    ]


@pytest.mark.parametrize(
    ("task", "template", "column"),
    [
        (SST2_TASK, "Review: {sentence} ({label})\nSentiment:", "'label', task.label_column"),
        (SAMSUM_TASK, "{dialogue}\nSummary: {summary}", "'summary', task.response_column"),
    ],
)
def test_a_template_that_reads_the_answer_is_refused(task, template, column):
    with pytest.raises(ValueError, match=rf"^task.prompt_template reads {column}: the answer would be in the prompt$"):
        RowRules.for_task(task.model_copy(update={"prompt_template": template}))
