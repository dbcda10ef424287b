"""Bad inputs: each is refused in one line that says where, and no stage is marked done.

One test per row of docs/FAILURES.md that is not already proved elsewhere (unknown key, wrong
type, k too large, layer out of range and tokenizer mismatch are in tests/test_config.py;
missing file, empty file and missing column in tests/test_tokenize_stage.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flexkd.cli import main
from flexkd.config.schema import ConfigError, apply_overrides, load_config, parse_config
from flexkd.data.sources import DataError
from flexkd.errors import StageError
from flexkd.pipeline import runner
from flexkd.pipeline.runner import run_pipeline
from flexkd.tracking.runs import TrackingError

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = REPO_ROOT / "pipelines"


def debug_config(root: Path, **overrides):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    )
    return parse_config(raw)


def assert_nothing_done(root: Path) -> None:
    """No stage of the pipeline under ``root`` has a manifest that says done."""
    done = [path for path in (root / "debug").rglob("manifest.json") if json.loads(path.read_text()).get("done")]
    assert done == [], done


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


def test_a_missing_pipeline_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"flexkd: config error: {tmp_path / 'nope.yaml'}: pipeline file not found"


def test_a_teacher_folder_that_does_not_exist_is_refused_before_any_stage(tmp_path):
    config = debug_config(
        tmp_path,
        **{
            "teacher.source": "hf",
            "teacher.path": str(tmp_path / "no-teacher"),
            "teacher.architecture": None,
            "teacher.tokenizer": None,
        },
    )
    with pytest.raises(ConfigError) as caught:
        run_pipeline(config)
    assert one_line(caught.value) == f"teacher.path: {tmp_path / 'no-teacher'} does not exist"
    assert not (tmp_path / "debug").exists()


def test_a_teacher_missing_from_the_registry_is_one_line(tmp_path):
    config = debug_config(
        tmp_path,
        **{"teacher.source": "mlflow", "teacher.path": "models:/no-such-teacher/1", "teacher.architecture": None},
    )
    with pytest.raises(ConfigError) as caught:
        run_pipeline(config)
    assert one_line(caught.value).startswith("teacher.path: models:/no-such-teacher/1")
    assert_nothing_done(tmp_path)


def test_an_unreachable_tracking_server_is_refused_in_seconds_without_its_password(tmp_path, local_ray):
    config = debug_config(tmp_path, **{"tracking.tracking_uri": "http://alice:s3cret@127.0.0.1:9"})
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        run_pipeline(config)
    assert time.monotonic() - started < 30  # MLflow's own retries take minutes
    assert one_line(caught.value) == (
        "tracking: cannot reach the MLflow tracking server at http://alice:***@127.0.0.1:9: Connection refused; "
        "start it, or fix tracking.tracking_uri / MLFLOW_TRACKING_URI"
    )
    assert_nothing_done(tmp_path)


def test_an_unreachable_ray_address_is_refused_in_seconds(tmp_path):
    """A separate driver: this test process is already connected to the session's Ray."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(debug_config(tmp_path).to_yaml())
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "flexkd.cli", "run", str(pipeline)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "flexkd: ray: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:9: Connection refused; "
        "start it, or unset RAY_ADDRESS to run on a local Ray"
    )
    assert "Traceback" not in run.stderr
    assert time.monotonic() - started < 240  # imports included; Ray's own GCS retries take minutes
    assert_nothing_done(tmp_path)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([], "the split is empty"),
        (
            [{"sentence": "fine", "label": 1}, {"sentence": "odd", "label": 7}],
            "row 1, column 'label': label 7 is not in the label set 0..1 / negative, positive; 1 of 2 rows are bad; "
            "fix them, or set data.on_bad_rows: skip",
        ),
    ],
    ids=["empty", "label-outside-the-label-set"],
)
def test_a_bad_train_split_is_refused_before_ray_starts(tmp_path, monkeypatch, rows, expected):
    monkeypatch.setattr(runner, "ensure_ray", _no_ray)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = debug_config(tmp_path, **{"data.train": {"path": str(train)}})
    with pytest.raises(DataError) as caught:
        run_pipeline(config)
    assert one_line(caught.value) == f"data.train ({train}): {expected}"
    assert not (tmp_path / "debug").exists()


def _no_ray() -> None:
    raise AssertionError("Ray was started")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MiB tmpfs: a real file system that really fills up (ENOSPC from the kernel)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def _fill(disk: Path) -> None:
    """Take every free byte of ``disk``."""
    with (disk / "ballast").open("wb") as ballast:
        block = b"\0" * (1 << 16)
        try:
            while True:
                ballast.write(block)
                ballast.flush()
        except OSError:
            pass


def test_a_full_disk_under_the_mlflow_artifacts_is_one_line(tmp_path, tiny_disk, local_ray):
    """The MLflow store's artifacts on a full disk: logging the config is the first write."""
    config = debug_config(tiny_disk, **{"tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    _fill(tiny_disk)
    with pytest.raises(TrackingError) as caught:
        run_pipeline(config)
    message = one_line(caught.value)
    assert message.startswith("tracking: cannot write config.yaml to the MLflow artifact store file://"), message
    assert message.endswith(": No space left on device"), message
    assert not (tiny_disk / "debug").exists()


def test_a_full_disk_while_a_stage_writes_its_artifacts_is_one_line_and_marks_nothing_done(
    tmp_path, tiny_disk, local_ray
):
    """artifact_root on a full tmpfs (the MLflow store and its artifacts stay on the real disk):
    tokenize cannot write its token shards."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("flexkd", artifact_location=(tmp_path / "mlartifacts").as_uri())
    config = debug_config(tiny_disk, **{"tracking.tracking_uri": uri})
    (tiny_disk / "debug").mkdir()
    _fill(tiny_disk)
    with pytest.raises(StageError) as caught:
        run_pipeline(config)
    message = one_line(caught.value)
    assert message.startswith("tokenize: ") and "No space left on device" in message, message
    assert_nothing_done(tiny_disk)


# --------------------------------------------------------------------------- one line from the CLI
# Each bad input of issue #17 through `flexkd validate` (no Ray): a non-zero exit, at most two
# lines on stderr, no traceback, and a message naming the file, the row or the field.


def pipeline_file(tmp_path: Path, **overrides) -> Path:
    """A copy of pipelines/debug.yaml (paths made absolute) with ``overrides`` applied."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(raw, {"artifact_root": str(tmp_path / "runs"), **overrides})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def refused(capsys, *argv: str) -> str:
    """Run the CLI; it must fail with one or two lines on stderr and no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err and 1 <= len(err.splitlines()) <= 2, err
    return err.rstrip("\n")


SENTENCES = [f"a film worth seeing (take {i})" for i in range(6)]
NOT_UTF8 = "row 2, column 'sentence': not valid UTF-8 (byte 0xe9 at offset 3); 1 of 6 rows are bad"


def _text_with_one_latin1_row(separator: str) -> bytes:
    lines = [f"{text}{separator}{i % 2}\n".encode() for i, text in enumerate(SENTENCES)]
    lines[2] = f"caf\xe9{separator}0\n".encode("latin-1")
    return f"sentence{separator}label\n".encode() + b"".join(lines)


def _binary_sentences() -> list[bytes]:
    sentences = [text.encode() for text in SENTENCES]
    sentences[2] = "caf\xe9".encode("latin-1")
    return sentences


def _write_jsonl(path: Path) -> Path:
    lines = [json.dumps({"sentence": text, "label": i % 2}).encode() + b"\n" for i, text in enumerate(SENTENCES)]
    lines[2] = b'{"sentence": "caf\xe9", "label": 0}\n'
    path.with_suffix(".jsonl").write_bytes(b"".join(lines))
    return path.with_suffix(".jsonl")


def _write_json_array(path: Path) -> Path:
    """Alpaca-style: one array of objects, with a byte-order mark."""
    rows = [json.dumps({"sentence": text, "label": i % 2}).encode() for i, text in enumerate(SENTENCES)]
    rows[2] = b'{"sentence": "caf\xe9", "label": 0}'
    path.with_suffix(".json").write_bytes(b"\xef\xbb\xbf[\n" + b",\n".join(rows) + b"\n]\n")
    return path.with_suffix(".json")


def _write_tsv(path: Path) -> Path:
    path.with_suffix(".tsv").write_bytes(_text_with_one_latin1_row("\t"))
    return path.with_suffix(".tsv")


def _write_csv(path: Path) -> Path:
    path.with_suffix(".csv").write_bytes(_text_with_one_latin1_row(","))
    return path.with_suffix(".csv")


def _write_parquet_binary(path: Path) -> Path:
    table = pa.table({"sentence": pa.array(_binary_sentences(), pa.binary()), "label": [i % 2 for i in range(6)]})
    pq.write_table(table, path.with_suffix(".parquet"))
    return path.with_suffix(".parquet")


def _write_parquet_string(path: Path) -> Path:
    """A string column holding bytes that are not UTF-8: pyarrow writes and reads it unchecked."""
    sentences = pa.array(_binary_sentences(), pa.binary()).view(pa.string())
    pq.write_table(pa.table({"sentence": sentences, "label": [i % 2 for i in range(6)]}), path.with_suffix(".parquet"))
    return path.with_suffix(".parquet")


def _write_parquet_folder(path: Path) -> Path:
    """Two files: the bad row is the first of the second file, and keeps its place in the split."""
    path.mkdir()
    sentences, labels = _binary_sentences(), [i % 2 for i in range(6)]
    for part, (start, stop) in enumerate([(0, 2), (2, 6)]):
        table = pa.table({"sentence": pa.array(sentences[start:stop], pa.binary()), "label": labels[start:stop]})
        pq.write_table(table, path / f"part-{part}.parquet")
    return path


def _write_saved_dataset(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict({"sentence": _binary_sentences(), "label": [i % 2 for i in range(6)]}).save_to_disk(path)
    return path


@pytest.mark.parametrize(
    "write",
    [
        _write_jsonl,
        _write_json_array,
        _write_tsv,
        _write_csv,
        _write_parquet_binary,
        _write_parquet_string,
        _write_parquet_folder,
        _write_saved_dataset,
    ],
    ids=["jsonl", "json-array", "tsv", "csv", "parquet-binary", "parquet-string", "parquet-folder", "saved-dataset"],
)
def test_text_that_is_not_utf8_is_one_line_naming_file_row_and_column_in_every_format(tmp_path, capsys, write):
    data = write(tmp_path / "train")
    pipeline = pipeline_file(tmp_path, **{"data.train": {"path": str(data)}})
    capsys.readouterr()  # what writing the file printed (save_to_disk's progress bar)
    assert refused(capsys, "validate", str(pipeline)) == (
        f"flexkd: data error: data.train ({data}): {NOT_UTF8}; fix them, or set data.on_bad_rows: skip"
    )


@pytest.mark.parametrize(
    "sentence, label, reason",
    [
        ("", 1, "column 'sentence': empty text"),
        (" \t ", 1, "column 'sentence': empty text"),
        (None, 1, "column 'sentence': empty (null)"),
        ("a\u0000b", 1, "column 'sentence': holds a NUL byte (at offset 1)"),
        ("fine", 2, "column 'label': label 2 is not in the label set 0..1 / negative, positive"),
        ("fine", None, "column 'label': empty (null)"),
    ],
    ids=["empty", "blank", "null", "nul-byte", "label-outside", "label-null"],
)
def test_a_bad_row_is_one_line_naming_file_row_column_and_count(tmp_path, capsys, sentence, label, reason):
    rows = [{"sentence": text, "label": i % 2} for i, text in enumerate(SENTENCES)]
    rows[3] = {"sentence": sentence, "label": label}
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline = pipeline_file(tmp_path, **{"data.eval": {"path": str(data)}})
    assert refused(capsys, "validate", str(pipeline)) == (
        f"flexkd: data error: data.eval ({data}): row 3, {reason}; 1 of 6 rows are bad; "
        "fix them, or set data.on_bad_rows: skip"
    )


def test_on_bad_rows_skip_logs_the_count_and_validates(tmp_path, capsys, caplog):
    data = _write_tsv(tmp_path / "train")
    # Five good rows: a batch of four, so that the rows left are enough to train on.
    settings = {"data.train": {"path": str(data)}, "data.on_bad_rows": "skip", "training.batch_size": 4}
    pipeline = pipeline_file(tmp_path, **settings)
    assert main(["validate", str(pipeline)]) == 0
    assert capsys.readouterr().out.startswith(f"{pipeline}: valid.")
    assert f"data.train ({data}): skipping 1 bad rows of 6 (data.on_bad_rows: skip); the first: row 2" in caplog.text


def test_scoring_on_training_rows_is_warned_of_by_content_not_by_path(tmp_path, capsys, caplog):
    data = _write_tsv(tmp_path / "train")  # 6 rows, row 2 not UTF-8
    settings = {"data.train": {"path": str(data)}, "data.on_bad_rows": "skip", "training.batch_size": 4}
    warning = "rows have the prompt of a data.train row"
    assert main(["validate", str(pipeline_file(tmp_path, **settings, **{"data.eval": {"path": str(data)}}))]) == 0
    assert f"data.eval ({data}): 5 of 5 {warning} (the first: row 0): the student is scored on rows it trained on" in (
        caplog.text
    )
    # A copy elsewhere, with two of its rows changed and one new: the three others are found.
    copy = tmp_path / "eval.jsonl"
    rows = [{"sentence": sentence, "label": 1} for sentence in SENTENCES]
    rows[0]["sentence"], rows[4]["sentence"] = "a new review", "another new one"
    copy.write_text("".join(json.dumps(row) + "\n" for row in [*rows, {"sentence": "unseen", "label": 0}]))
    caplog.clear()
    assert main(["validate", str(pipeline_file(tmp_path, **settings, **{"data.eval": {"path": str(copy)}}))]) == 0
    assert f"data.eval ({copy}): 3 of 7 {warning} (the first: row 1)" in caplog.text
    # Only the rows each split keeps count: the train rows past data.train.limit are not trained on.
    caplog.clear()
    limited = settings | {"data.train": {"path": str(data), "limit": 4}}
    assert main(["validate", str(pipeline_file(tmp_path, **limited, **{"data.eval": {"path": str(copy)}}))]) == 0
    assert f"data.eval ({copy}): 2 of 7 {warning} (the first: row 1)" in caplog.text
    caplog.clear()
    assert main(["validate", str(pipeline_file(tmp_path, **settings))]) == 0
    assert "scored on rows it trained on" not in caplog.text


def test_a_warmup_longer_than_the_run_is_warned_of(tmp_path, caplog):
    assert main(["validate", str(pipeline_file(tmp_path, **{"training.warmup_steps": 48}))]) == 0
    assert (
        "training.warmup_steps = 48 is above training.steps = 12: the learning rate ends at 0.00075, never "
        "reaching training.learning_rate (0.003)"
    ) in caplog.text
    caplog.clear()
    assert main(["validate", str(pipeline_file(tmp_path, **{"training.warmup_steps": 12}))]) == 0
    assert "warmup_steps" not in caplog.text


def test_training_rows_in_the_eval_split_are_found_whatever_the_column_order_or_value_type(tmp_path, caplog):
    """The same text is the same row: two columns read in either order, a year as a JSON number
    or as CSV text. Splits whose templates read other columns are compared by file only."""
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"title": f"film {i}", "year": 2000 + i, "label": i % 2}) + "\n" for i in range(8))
    )
    held_out = tmp_path / "eval.csv"
    held_out.write_text("year,title,label\n2003,film 3,1\n1999,film 3,1\n2005,film 5,1\n")
    settings = {
        "data.train": {"path": str(train)},
        "task.prompt_template": "{title} ({year}):",
        "training.batch_size": 4,
    }
    eval_template = {"data.eval": {"path": str(held_out), "prompt_template": "{year}: {title}"}}
    assert main(["validate", str(pipeline_file(tmp_path, **settings, **eval_template))]) == 0
    assert f"data.eval ({held_out}): 2 of 3 rows have the prompt of a data.train row (the first: row 0)" in caplog.text
    caplog.clear()
    own_columns = {"data.eval": {"path": str(train), "prompt_template": "{title}:"}}
    assert main(["validate", str(pipeline_file(tmp_path, **settings, **own_columns))]) == 0
    assert f"data.eval ({train}) is the file data.train reads" in caplog.text


def test_a_split_with_only_bad_rows_is_refused_even_when_skipping(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"sentence": "", "label": 1}\n{"sentence": "fine", "label": 5}\n')
    pipeline = pipeline_file(tmp_path, **{"data.train": {"path": str(data)}, "data.on_bad_rows": "skip"})
    assert refused(capsys, "validate", str(pipeline)) == (
        f"flexkd: data error: data.train ({data}): row 0, column 'sentence': empty text; "
        "all 2 rows are bad, none is left to use"
    )


def test_bad_rows_after_the_limit_do_not_count(tmp_path, capsys):
    rows = [{"sentence": text, "label": i % 2} for i, text in enumerate(SENTENCES)]
    rows[4]["label"] = 9
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def limited(rows: int) -> str:
        return str(
            pipeline_file(tmp_path, **{"data.train": {"path": str(data), "limit": rows}, "training.batch_size": 4})
        )

    assert main(["validate", limited(4)]) == 0
    assert refused(capsys, "validate", limited(5)).endswith(  # row 5 is the fifth good row: six rows read
        "row 4, column 'label': label 9 is not in the label set 0..1 / negative, positive; 1 of 6 rows are bad; "
        "fix them, or set data.on_bad_rows: skip"
    )


def _columns_text_label(tmp_path: Path) -> Path:
    data = tmp_path / "eval.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    return data


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            lambda tmp: {"data.train": {"path": str(tmp / "nope.jsonl")}},
            lambda tmp: f"flexkd: data error: data.train ({tmp / 'nope.jsonl'}): file not found",
        ),
        (
            lambda tmp: {"data.eval": {"path": str(_columns_text_label(tmp))}},
            lambda tmp: (
                f"flexkd: data error: data.eval ({tmp / 'eval.jsonl'}): missing column 'sentence' "
                "(named by the prompt template); columns are: text, label"
            ),
        ),
        (
            lambda tmp: {"task.prompt_template": "Review: {sentense}\nSentiment:"},
            lambda tmp: (
                f"flexkd: data error: data.train ({REPO_ROOT / 'flexkd/assets/samples/sst2_train.jsonl'}): "
                "missing column 'sentense' (named by the prompt template); columns are: sentence, label"
            ),
        ),
        (
            lambda tmp: {"task.label_column": "stars"},
            lambda tmp: (
                f"flexkd: data error: data.train ({REPO_ROOT / 'flexkd/assets/samples/sst2_train.jsonl'}): "
                "missing column 'stars' (named by task.label_column); columns are: sentence, label"
            ),
        ),
        (
            lambda tmp: {"task.label_names": ["negative", " "]},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: task: task.label_names[1] is empty; "
                "each label needs a name (its verbalizer)"
            ),
        ),
        (
            lambda tmp: {"task.label_names": ["negative", "negative"]},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: task: task.label_names[1] 'negative' is listed twice"
            ),
        ),
        (
            lambda tmp: {"task.label_names": ["positive", "positively"]},
            lambda tmp: (
                "flexkd: config error: task.label_names: 'positive' and 'positively' share their first "
                "token 'Ġp'; use names that start differently"
            ),
        ),
        (
            lambda tmp: {"teacher.tokenizer": str(tmp / "no-tokenizer")},
            lambda tmp: (
                "flexkd: config error: teacher.tokenizer: cannot load a tokenizer: model folder not found: "
                f"{tmp / 'no-tokenizer'}"
            ),
        ),
        (
            lambda tmp: {"student.architecture.hiden_size": 32},
            lambda tmp: (
                "flexkd: config error: student.architecture.hiden_size: not a LlamaConfig field; "
                "did you mean 'hidden_size'?"
            ),
        ),
        (
            lambda tmp: {"teacher.architecture.num_layers": 2},
            lambda tmp: (
                "flexkd: config error: teacher.architecture.num_layers: not a LlamaConfig field; "
                "did you mean 'num_hidden_layers'?"
            ),
        ),
        (
            lambda tmp: {"student.architecture.vocab_size": 512},
            lambda tmp: (
                "flexkd: config error: student.architecture.vocab_size: flexkd sets it "
                "(from the tokenizer and the task); remove it"
            ),
        ),
        (
            lambda tmp: {"student.architecture.hidden_size": 30},
            lambda tmp: (
                "flexkd: config error: student.architecture: hidden_size = 30 is not a multiple of "
                "num_attention_heads = 4"
            ),
        ),
        (
            lambda tmp: {"teacher.architecture.hidden_size": 66},
            lambda tmp: (
                "flexkd: config error: teacher.architecture: hidden_size = 66 is not a multiple of "
                "num_attention_heads = 4"
            ),
        ),
        (
            lambda tmp: {"student.architecture.num_key_value_heads": 3},
            lambda tmp: (
                "flexkd: config error: student.architecture: num_attention_heads = 4 is not a multiple of "
                "num_key_value_heads = 3"
            ),
        ),
        (
            lambda tmp: {"student": {"init": "pretrained", "path": str(tmp / "no-student")}},
            lambda tmp: f"flexkd: config error: student.path: {tmp / 'no-student'} does not exist",
        ),
        (
            lambda tmp: {"student": {"init": "pretrained", "path": str(tmp), "architecture": {"hidden_size": 32}}},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: student: student.architecture: a pretrained "
                "student has the shape of its own config (student.path); remove it"
            ),
        ),
        (
            lambda tmp: {"artifact_root": str(tmp / "pipeline.yaml" / "runs")},
            lambda tmp: (
                f"flexkd: config error: artifact_root {tmp / 'pipeline.yaml' / 'runs'}: "
                f"{tmp / 'pipeline.yaml'} is a file, not a folder"
            ),
        ),
        (
            lambda tmp: {
                "data.train": {"path": str(REPO_ROOT / "flexkd/assets/samples/sst2_train.jsonl"), "limit": 15},
                "training.batch_size": 16,
                "resources.num_workers": 2,
            },
            lambda tmp: (
                f"flexkd: data error: data.train ({REPO_ROOT / 'flexkd/assets/samples/sst2_train.jsonl'}): 15 rows "
                "cannot give each of 2 workers (resources.num_workers) the 8 it takes per batch (training.batch_size "
                "16); use more rows, a smaller batch or fewer workers"
            ),
        ),
        (
            lambda tmp: {
                "data.transfer": {"path": str(REPO_ROOT / "flexkd/assets/samples/sst2_test.jsonl"), "limit": 1},
                "training.batch_size": 16,
                "resources.num_workers": 2,
            },
            lambda tmp: (
                f"flexkd: data error: data.transfer ({REPO_ROOT / 'flexkd/assets/samples/sst2_test.jsonl'}): 1 rows "
                "cannot give each of 2 workers (resources.num_workers) the 1 it takes per batch (training.batch_size "
                "16); use more rows, a smaller batch or fewer workers"
            ),
        ),
        (
            lambda tmp: {
                "data.transfer": {"path": str(REPO_ROOT / "flexkd/assets/samples/sst2_test.jsonl")},
                "training.batch_size": 2,
                "resources.num_workers": 2,
            },
            lambda tmp: (
                "flexkd: config error: training.batch_size = 2 gives each of 2 workers 1 row; with data.transfer "
                "a worker's batch holds labeled and unlabeled rows, so it needs at least 2"
            ),
        ),
        (
            lambda tmp: {
                "data.score": {"path": str(REPO_ROOT / "flexkd/assets/samples/sst2_train.jsonl"), "limit": 1},
                "resources.num_workers": 2,
            },
            lambda tmp: (
                f"flexkd: data error: data.score ({REPO_ROOT / 'flexkd/assets/samples/sst2_train.jsonl'}): 1 rows "
                "cannot give each of 2 workers (resources.num_workers) one to score; use more rows or fewer workers"
            ),
        ),
        (
            lambda tmp: {"training.batch_size": 6, "resources.num_workers": 4},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: <top level>: training.batch_size = 6 is not a "
                "multiple of resources.num_workers = 4 (each worker takes an equal slice of every batch)"
            ),
        ),
    ],
    ids=[
        "missing-data-file",
        "missing-column",
        "template-names-an-unknown-column",
        "missing-label-column",
        "empty-label-name",
        "label-name-twice",
        "colliding-verbalizers",
        "missing-tokenizer",
        "student-architecture-typo",
        "teacher-architecture-typo",
        "architecture-field-flexkd-sets",
        "student-heads-do-not-divide-the-width",
        "teacher-heads-do-not-divide-the-width",
        "heads-not-whole-key-value-groups",
        "missing-student-path",
        "architecture-of-a-pretrained-student",
        "artifact-root-under-a-file",
        "train-rows-fewer-than-a-batch-per-worker",
        "transfer-rows-fewer-than-their-share-per-worker",
        "transfer-with-one-row-per-worker",
        "score-rows-fewer-than-the-workers",
        "batch-not-a-multiple-of-the-workers",
    ],
)
def test_validate_refuses_in_one_line_what_would_fail_after_ray_started(tmp_path, capsys, overrides, expected):
    pipeline = pipeline_file(tmp_path, **overrides(tmp_path))
    assert refused(capsys, "validate", str(pipeline)) == expected(tmp_path)


def test_run_refuses_bad_data_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "ensure_ray", _no_ray)
    data = _write_tsv(tmp_path / "train")
    pipeline = pipeline_file(tmp_path, **{"data.train": {"path": str(data)}})
    assert refused(capsys, "run", str(pipeline)) == (
        f"flexkd: data error: data.train ({data}): {NOT_UTF8}; fix them, or set data.on_bad_rows: skip"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (
            {"num_workers": 3},
            "3 workers (resources.num_workers) x 1 CPUs (resources.cpus_per_worker) need 3 CPUs; the Ray on this "
            "machine has 2",
        ),
        ({"cpus_per_worker": 2.5}, "1 workers (resources.num_workers) x 2.5 CPUs (resources.cpus_per_worker) need 2.5"),
        ({"use_gpu": True}, "1 workers (resources.num_workers) x 1 GPU (resources.use_gpu) need 1 GPUs; the Ray"),
    ],
)
def test_run_refuses_workers_the_local_ray_cannot_hold(tmp_path, capsys, monkeypatch, local_ray, resources, expected):
    """Ray would wait for them forever. Checked as the first stage that starts workers (score)
    begins, on a Ray of 2 CPUs and no GPU that flexkd started itself (no autoscaler can grow it)."""
    from flexkd.cluster import local

    monkeypatch.setattr(local, "_started_here", True)
    monkeypatch.setattr(local.ray, "cluster_resources", lambda: {"CPU": 2.0})

    def past_the_check(*args):  # without the check, fail here rather than hang in the stage
        raise StageError("the run went past the capacity check")

    monkeypatch.setitem(runner.SPECS, "score", dataclasses.replace(runner.SPECS["score"], run=past_the_check))
    pipeline = pipeline_file(tmp_path, **{f"resources.{key}": value for key, value in resources.items()})
    args = ["--set", "training.batch_size=6"] if resources.get("num_workers") == 3 else []

    def last_line() -> str:  # tokenize ran first, and MLflow may say it made its database
        assert main(["run", str(pipeline), *args]) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return err.splitlines()[-1]

    assert last_line().startswith(f"flexkd: resources: {expected}")
    monkeypatch.setattr(local, "_started_here", False)  # a Ray joined, which an autoscaler may grow
    assert last_line() == "flexkd: the run went past the capacity check"


def test_a_real_flexkd_validate_process_prints_one_line_for_a_missing_data_file(tmp_path):
    """In a process of its own, as a user runs it: the in-process tests above share pytest's
    logging and imports, so they could miss a line a fresh process prints (a warning at import)."""
    missing = tmp_path / "nowhere.jsonl"
    pipeline = pipeline_file(tmp_path, **{"data.train": {"path": str(missing)}})
    done = subprocess.run(
        [sys.executable, "-m", "flexkd.cli", "validate", str(pipeline)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert done.returncode != 0
    assert done.stderr.splitlines() == [f"flexkd: data error: data.train ({missing}): file not found"], done.stderr


DEBUG_TEXT = (PIPELINES / "debug.yaml").read_text()
SCORING_LINE = DEBUG_TEXT.splitlines().index("scoring: {score: grad, batch_size: 16}") + 1
LOSS_LINE = next(number for number, line in enumerate(DEBUG_TEXT.splitlines(), 1) if line.startswith("loss:"))


@pytest.mark.parametrize(
    "content, settings, expected",
    [
        (
            DEBUG_TEXT.encode(),
            ["name.first=x"],
            "flexkd: config error: --set name.first: name is 'debug', not a section with fields",
        ),
        (b"", ["name=x"], "flexkd: config error: {path}: the pipeline file is empty"),
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            [],
            "flexkd: config error: {path}: line 1: not UTF-8 text (byte 0x89); a pipeline file is UTF-8 YAML",
        ),
        (
            DEBUG_TEXT.replace("name: debug", "name: d\xe9bug").encode("latin-1"),
            [],
            "flexkd: config error: {path}: line 2: not UTF-8 text (byte 0xe9); a pipeline file is UTF-8 YAML",
        ),
        (
            DEBUG_TEXT.replace("scoring: {score: grad", "scoring: {score: [grad").encode(),
            [],
            "flexkd: config error: {path}: not valid YAML: "
            f"line {SCORING_LINE}, column 39: " + "expected ',' or ']', but got '}}'",
        ),
        (
            (DEBUG_TEXT + "loss: {gamma: 0.5}\n").encode(),
            [],
            "flexkd: config error: {path}: not valid YAML: "
            f"line {len(DEBUG_TEXT.splitlines()) + 1}, column 1: key 'loss' is given twice (first on line {LOSS_LINE})",
        ),
        (
            DEBUG_TEXT.encode(),
            ["loss.gama=1", "training.steps=many"],
            "flexkd: config error: {path}: loss.gama: unknown key\n"
            "flexkd: config error: {path}: training.steps: Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            DEBUG_TEXT.encode(),
            ["loss={gamma: 1, gamma: 2}"],
            "flexkd: config error: --set loss: not a YAML value (line 1, column 12: key 'gamma' is given twice "
            "(first on line 1))",
        ),
    ],
    ids=[
        "set-through-a-scalar",
        "set-on-an-empty-file",
        "binary-file",
        "latin1-file",
        "yaml-syntax-error",
        "duplicate-key",
        "two-errors",
        "duplicate-key-in-set",
    ],
)
def test_a_bad_pipeline_file_or_set_is_one_line_per_problem(tmp_path, capsys, content, settings, expected):
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(content)
    argv = ["validate", str(path), *(part for setting in settings for part in ("--set", setting))]
    assert refused(capsys, *argv) == expected.format(path=path)


@pytest.mark.parametrize(
    "address, reason",
    [
        ("http://127.0.0.1:99999", "Port out of range 0-65535"),
        ("127.0.0.1:82x5", "Port could not be cast to integer value as '82x5'"),
        ("http://:8265", "no host"),
    ],
)
def test_a_bad_cluster_address_is_one_line(capsys, address, reason):
    assert refused(capsys, "status", "flexkd-debug-0", "--address", address) == (
        f"flexkd: config error: --address {address}: {reason}; expected http://HOST:PORT"
    )


def test_verbose_adds_the_traceback_to_a_user_error(capsys):
    assert main(["--verbose", "validate", str(PIPELINES / "debug.yaml"), "--set", "loss.gama=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].endswith("loss.gama: unknown key")


def test_a_bug_says_it_is_one_above_its_traceback(capsys, monkeypatch):
    def broken(config):
        raise KeyError("hidden_size")

    monkeypatch.setattr("flexkd.pipeline.preflight.preflight", broken)
    assert main(["validate", str(PIPELINES / "debug.yaml")]) == 3
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        "flexkd: internal error: this is a bug in flexkd, please report it with the traceback below "
        "(KeyError: 'hidden_size')"
    )
    assert "Traceback" in err


@pytest.mark.parametrize(("batch_sizes", "refused_at_once"), [([4, 8], False), ([24, 32], True)])
def test_a_sweep_is_refused_for_too_few_rows_only_when_its_smallest_batch_cannot_fill(
    tmp_path, capsys, batch_sizes, refused_at_once
):
    sst2 = str(REPO_ROOT / "flexkd/assets/samples/sst2_train.jsonl")
    settings = {
        "data.train": {"path": sst2, "limit": 20},
        "training.batch_size": 32,
        "tune": {"search_space": {"training.batch_size": {"choice": batch_sizes}}},
    }
    pipeline = pipeline_file(tmp_path, **settings)
    if refused_at_once:
        assert refused(capsys, "validate", str(pipeline)) == (
            f"flexkd: data error: data.train ({sst2}): 20 rows cannot give each of 1 workers (resources.num_workers) "
            "the 24 it takes per batch (training.batch_size 24); use more rows, a smaller batch or fewer workers"
        )
    else:
        assert main(["validate", str(pipeline)]) == 0


def _tokenizer_without_a_chat_template(tmp: Path) -> Path:
    folder = tmp / "tokenizer"
    shutil.copytree(REPO_ROOT / "flexkd" / "assets" / "tiny-tokenizer", folder)
    (folder / "chat_template.jinja").unlink()
    return folder


def _csv_with_a_repeated_header(tmp: Path) -> Path:
    path = tmp / "train.csv"
    path.write_text("sentence,sentence,label\n" + "".join(f"good,fine,{i % 2}\n" for i in range(20)))
    return path


def _parquet_folder_with_one_corrupt_file(tmp: Path) -> Path:
    folder = tmp / "train"
    folder.mkdir()
    pq.write_table(pa.table({"sentence": ["good"] * 20, "label": [0, 1] * 10}), folder / "a.parquet")
    (folder / "b.parquet").write_text("not parquet")
    return folder


def _model_folder(tmp: Path, vocab_size: int = 512, weights: str | None = "model.safetensors") -> Path:
    """A tiny Llama folder with the tiny tokenizer (512 tokens): its config, and its weights saved
    as ``weights`` (None: no weight file at all)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp / "model"
    shutil.copytree(REPO_ROOT / "flexkd" / "assets" / "tiny-tokenizer", folder)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config.save_pretrained(folder)
    if weights == "model.safetensors":
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar is not the CLI's output
            LlamaForCausalLM(config).save_pretrained(folder)
    elif weights is not None:
        (folder / weights).write_bytes(b"pickled weights")
    return folder


def _hf_teacher(folder: Path) -> dict:
    return {"teacher": {"source": "hf", "path": str(folder), "architecture": None, "tokenizer": None}}


def _jsonl_with_bad_json_at(tmp: Path, row: int, rows: int) -> Path:
    path = tmp / "train.jsonl"
    lines = [json.dumps({"sentence": f"a film, take {i}", "label": i % 2}) for i in range(rows)]
    lines[row] = '{"sentence": "cut short", "label"'
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            lambda tmp: {"data.train": {"path": str(_csv_with_a_repeated_header(tmp))}},
            lambda tmp: (
                f"flexkd: data error: data.train ({tmp / 'train.csv'}): column 'sentence' (named by the "
                "prompt template) appears 2 times in the header; rename all but one"
            ),
        ),
        (
            lambda tmp: {"data.train": {"path": str(_parquet_folder_with_one_corrupt_file(tmp))}},
            lambda tmp: (
                f"flexkd: data error: data.train ({tmp / 'train'}): {tmp / 'train' / 'b.parquet'}: Parquet "
                "magic bytes not found in footer. Either the file is corrupted or this is not a parquet file."
            ),
        ),
        (
            lambda tmp: {"data.train": {"path": "foo://bucket/train.jsonl"}},
            lambda tmp: (
                "flexkd: data error: data.train (foo://bucket/train.jsonl): cannot open "
                "foo://bucket/train.jsonl: Unrecognized filesystem type in URI: foo://bucket/train.jsonl"
            ),
        ),
        (
            lambda tmp: {"student.architecture.hidden_size": "32"},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: student.architecture: hidden_size: "
                "expected a positive integer, got '32'"
            ),
        ),
        (
            lambda tmp: {"teacher.architecture.num_attention_heads": 0},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: teacher.architecture: num_attention_heads: "
                "expected a positive integer, got 0"
            ),
        ),
        (
            lambda tmp: {"student.architecture.attention_dropout": 5.0},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: student.architecture: attention_dropout: "
                "expected a probability in [0, 1), got 5.0"
            ),
        ),
        (
            lambda tmp: {"task.prompt_template": "Review: {sentence:d}\nSentiment:"},
            lambda tmp: (
                "flexkd: config error: task.prompt_template: '{sentence:d}' formats the column; use plain "
                "{sentence} (the row's text as it is)"
            ),
        ),
        (
            lambda tmp: {"training.seed": 2**32},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: training.seed: Input should be less than "
                "or equal to 4294967295"
            ),
        ),
        (
            lambda tmp: {"loss.gamma": float("inf")},
            lambda tmp: f"flexkd: config error: {tmp / 'pipeline.yaml'}: loss.gamma: Input should be a finite number",
        ),
        (
            lambda tmp: {"training.steps": True},
            lambda tmp: f"flexkd: config error: {tmp / 'pipeline.yaml'}: training.steps: expected a number, got True",
        ),
        (
            lambda tmp: {"layer_map": [[2, 1], [4, 2], [2, 1]]},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: <top level>: layer_map lists [2, 1] more "
                "than once, which would count its loss again"
            ),
        ),
        (
            lambda tmp: {"tune": {"search_space": {"selection.k": {"grid": [16, 999]}}}},
            lambda tmp: (
                "flexkd: config error: tune.search_space.selection.k = 999: selection.k = 999 exceeds "
                "min(d_student=32, d_teacher=64) = 32"
            ),
        ),
        (
            lambda tmp: {"data.max_length": 4},
            lambda tmp: (
                "flexkd: config error: data.max_length: 4 leaves a prompt 4 tokens, and the end of "
                "task.prompt_template after its last column takes 6: no row's text would be left; raise "
                "data.max_length or shorten the template"
            ),
        ),
        (
            lambda tmp: {"teacher.tokenizer": str(_tokenizer_without_a_chat_template(tmp)), "task.chat_template": True},
            lambda tmp: "flexkd: config error: task.chat_template is true but the tokenizer has no chat template",
        ),
        (
            lambda tmp: _hf_teacher(_model_folder(tmp, weights=None)),
            lambda tmp: (
                f"flexkd: config error: teacher.path: {tmp / 'model'}: no model.safetensors (nor "
                "model.safetensors.index.json): the folder holds no weights"
            ),
        ),
        (
            lambda tmp: _hf_teacher(_model_folder(tmp, weights="pytorch_model.bin")),
            lambda tmp: (
                f"flexkd: config error: teacher.path: {tmp / 'model'}: no model.safetensors, only pytorch_model.bin: "
                "flexkd loads safetensors only (a .bin can run code when loaded); convert it once with "
                "transformers' save_pretrained"
            ),
        ),
        (
            lambda tmp: {"student": {"init": "pretrained", "path": str(_model_folder(tmp, weights=None))}},
            lambda tmp: (
                f"flexkd: config error: student.path: {tmp / 'model'}: no model.safetensors (nor "
                "model.safetensors.index.json): the folder holds no weights"
            ),
        ),
        (
            lambda tmp: _hf_teacher(_model_folder(tmp, vocab_size=100)),
            lambda tmp: (
                "flexkd: config error: teacher.path: vocab_size 100 is below the 512 tokens of the teacher's "
                "tokenizer: the ids from 100 on have no embedding"
            ),
        ),
        (
            lambda tmp: {"teacher.path": str(tmp)},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: teacher: teacher.path: source 'random' does not "
                "read it; remove it or set the source"
            ),
        ),
        (
            lambda tmp: {"teacher.source": "hf", "teacher.path": str(tmp), "teacher.tokenizer": None},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: teacher: teacher.architecture: source 'hf' has the "
                "shape of its own config; only source 'random' reads it"
            ),
        ),
        (
            lambda tmp: {"student.path": str(tmp)},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: student: student.path: init 'random' does not read "
                "it; remove it or set init 'pretrained'"
            ),
        ),
        (
            lambda tmp: {"student.architecture.hidden_act": "relu6x"},
            lambda tmp: (
                "flexkd: config error: student.architecture.hidden_act = 'relu6x' is not an activation "
                "transformers has; did you mean 'relu6'?"
            ),
        ),
        (
            lambda tmp: {"data.max_length": 4096},
            lambda tmp: (
                "flexkd: config error: data.max_length: 4096 exceeds the teacher's max_position_embeddings (2048), "
                "the longest row it was built for"
            ),
        ),
        (
            lambda tmp: {"tracking.experiment": ""},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: tracking.experiment: String should have at least "
                "1 character"
            ),
        ),
        (
            lambda tmp: {"task": {"kind": "generation", "prompt_template": "{sentence}", "label_names": ["a", "b"]}},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: task: task.label_names: a generation task has no "
                "labels (its answer is task.response_column)"
            ),
        ),
        (
            lambda tmp: {"data.eval.response_column": "summary"},
            lambda tmp: (
                f"flexkd: config error: {tmp / 'pipeline.yaml'}: <top level>: data.eval.response_column: a "
                "classification task's answer is task.label_column"
            ),
        ),
    ],
    ids=[
        "csv-header-names-a-column-twice",
        "parquet-folder-with-a-corrupt-file",
        "path-with-an-unknown-scheme",
        "architecture-size-as-a-string",
        "architecture-with-zero-heads",
        "architecture-dropout-above-one",
        "template-with-a-format-spec",
        "seed-beyond-32-bits",
        "infinite-loss-weight",
        "boolean-as-a-step-count",
        "layer-pair-listed-twice",
        "tune-value-validate-did-not-check",
        "max-length-below-the-templates-end",
        "chat-template-the-tokenizer-lacks",
        "teacher-folder-without-weights",
        "teacher-folder-with-pickled-weights-only",
        "student-folder-without-weights",
        "teacher-vocabulary-below-the-tokenizer",
        "random-teacher-with-a-path",
        "pretrained-teacher-with-an-architecture",
        "random-student-with-a-path",
        "activation-transformers-lacks",
        "max-length-past-the-models-positions",
        "empty-experiment-name",
        "labels-for-a-generation-task",
        "response-column-for-a-classification-split",
    ],
)
def test_validate_refuses_in_one_line_what_used_to_crash_it_or_pass(tmp_path, capsys, overrides, expected):
    pipeline = pipeline_file(tmp_path, **overrides(tmp_path))
    assert refused(capsys, "validate", str(pipeline)) == expected(tmp_path)


def test_a_row_longer_than_pyarrows_default_block_validates(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"sentence": "x" * (2 << 20) if i == 5 else f"fine {i}", "label": i % 2} for i in range(40)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["validate", str(pipeline_file(tmp_path, **{"data.train": {"path": str(data)}}))]) == 0


def test_bad_json_past_the_first_block_names_its_row_in_the_file(tmp_path, capsys, monkeypatch):
    from flexkd.data import sources

    # Blocks of about 1,400 rows: pyarrow counts a bad row from the start of the block it reads.
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1 << 16)
    data = _jsonl_with_bad_json_at(tmp_path, 5000, 6000)
    pipeline = pipeline_file(tmp_path, **{"data.train": {"path": str(data), "limit": None}})
    assert refused(capsys, "validate", str(pipeline)) == (
        f"flexkd: data error: data.train ({data}): JSON parse error: Missing a colon after a name of object member. "
        "in row 5000"
    )


def test_a_row_longer_than_a_block_is_one_line_naming_where(tmp_path, capsys, monkeypatch):
    from flexkd.data import sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 1 << 16)
    data = tmp_path / "train.jsonl"
    rows = [{"sentence": "x" * (1 << 17) if i == 5 else f"fine {i}", "label": i % 2} for i in range(40)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline = pipeline_file(tmp_path, **{"data.train": {"path": str(data)}})
    assert refused(capsys, "validate", str(pipeline)) == (
        f"flexkd: data error: data.train ({data}): row 5 or one after it is longer than 0.0625 MB, the most one row may hold"
    )


def test_a_sharded_teacher_with_a_shard_missing_is_named(tmp_path):
    from flexkd.models.loading import missing_weights

    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert missing_weights(tmp_path) == (
        "model.safetensors.index.json lists model-00002-of-00002.safetensors, which is not there (1 of 2 shards missing)"
    )
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert missing_weights(tmp_path) is None
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    assert missing_weights(tmp_path) == (
        "model.safetensors.index.json is not a safetensors index (a JSON object with a weight_map)"
    )
    (tmp_path / "model.safetensors").write_bytes(b"")  # transformers reads it first, before any index
    assert missing_weights(tmp_path) is None


def test_a_trainer_folder_without_weights_is_not_taken_for_pickled_weights(tmp_path):
    from flexkd.models.loading import missing_weights

    (tmp_path / "training_args.bin").write_bytes(b"")
    assert (
        missing_weights(tmp_path)
        == "no model.safetensors (nor model.safetensors.index.json): the folder holds no weights"
    )
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
    assert missing_weights(tmp_path).startswith("no model.safetensors, only pytorch_model-00001-of-00002.bin: ")
