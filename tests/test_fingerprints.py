"""Stage fingerprints cover what the inputs *are*, and manifests are written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from flexkd.config.schema import apply_overrides, load_config, parse_config
from flexkd.models.plan import load_pipeline_tokenizer, load_teacher
from flexkd.pipeline.runner import pipeline_stages, planned_fingerprint, read_manifest, run_pipeline, write_manifest
from flexkd.pipeline.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "flexkd" / "assets" / "samples"


def _debug_config(root: Path, train: Path):
    raw = load_config(REPO_ROOT / "pipelines" / "debug.yaml").model_dump(mode="json")
    overrides = {
        "artifact_root": str(root / "runs"),
        "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
        "data.train": {"path": str(train), "limit": 128},
    }
    return parse_config(apply_overrides(raw, overrides))


def _copy_train(root: Path) -> Path:
    train = root / "train.jsonl"
    shutil.copy(SAMPLES / "sst2_train.jsonl", train)
    return train


def _edit_first_row(train: Path) -> None:
    """Change one sentence of the file in place, keeping its path (and here its size)."""
    lines = train.read_text().splitlines()
    row = json.loads(lines[0])
    row["sentence"] = row["sentence"][::-1]
    lines[0] = json.dumps(row)
    train.write_text("\n".join(lines) + "\n")


def test_a_data_file_changed_in_place_changes_every_stage_fingerprint(tmp_path):
    train = _copy_train(tmp_path)
    config = _debug_config(tmp_path, train)
    before = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    _edit_first_row(train)
    after = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    assert all(before[stage] != after[stage] for stage in before), (before, after)


def test_a_stages_code_revision_changes_its_fingerprint_and_every_later_ones(tmp_path, monkeypatch):
    from dataclasses import replace

    from flexkd.pipeline import runner

    config = _debug_config(tmp_path, _copy_train(tmp_path))
    before = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    score = runner.SPECS["score"]
    monkeypatch.setitem(runner.SPECS, "score", replace(score, revision=score.revision + 1))
    after = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    changed = {stage for stage in before if before[stage] != after[stage]}
    # The debug pipeline's stages: tokenize, then score and everything that reads it.
    assert "score" in changed and changed == set(before) - {"tokenize"}, (before, after)


def test_an_unlabeled_transfer_file_changed_in_place_changes_every_stage_fingerprint(tmp_path):
    transfer = tmp_path / "unlabeled.jsonl"
    shutil.copy(SAMPLES / "sst2_train.jsonl", transfer)
    config = parse_config(
        apply_overrides(
            _debug_config(tmp_path, _copy_train(tmp_path)).model_dump(mode="json"),
            {"data.transfer": {"path": str(transfer)}},
        )
    )
    before = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    _edit_first_row(transfer)
    after = {stage: planned_fingerprint(config, stage) for stage in pipeline_stages(config)}
    assert all(before[stage] != after[stage] for stage in before), (before, after)


def test_a_teacher_folder_or_tokenizer_changed_at_the_same_path_changes_every_stage_fingerprint(tmp_path):
    """A new teacher release written over the old folder, or a retrained tokenizer, is a new input."""
    debug = _debug_config(tmp_path, _copy_train(tmp_path))
    folder, tokenizer_dir = tmp_path / "teacher", tmp_path / "tokenizer"
    load_teacher(debug).save_pretrained(folder)
    load_pipeline_tokenizer(debug).save_pretrained(tokenizer_dir)
    config = parse_config(
        apply_overrides(
            debug.model_dump(mode="json"),
            {"teacher": {"source": "hf", "path": str(folder), "tokenizer": str(tokenizer_dir), "architecture": None}},
        )
    )
    stages = pipeline_stages(config)
    first = {stage: planned_fingerprint(config, stage) for stage in stages}

    weights = folder / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF  # one weight's byte: same size, same path
    weights.write_bytes(bytes(damaged))
    second = {stage: planned_fingerprint(config, stage) for stage in stages}
    assert all(first[stage] != second[stage] for stage in stages), (first, second)

    vocabulary = tokenizer_dir / "tokenizer.json"
    vocabulary.write_text(vocabulary.read_text().replace('"<|im_end|>"', '"<|im_stop|>"', 1))
    third = {stage: planned_fingerprint(config, stage) for stage in stages}
    assert all(second[stage] != third[stage] for stage in stages), (second, third)


def test_a_touched_but_unchanged_file_keeps_its_fingerprint_and_is_hashed_again(tmp_path):
    train = _copy_train(tmp_path)
    config = _debug_config(tmp_path, train)
    before = planned_fingerprint(config, "tokenize")
    stat = train.stat()
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert planned_fingerprint(config, "tokenize") == before
    cache = json.loads((tmp_path / "runs" / ".content-hashes.json").read_text())
    assert sum(str(train.resolve()) in key for key in cache) == 2  # one entry per (size, mtime) seen


def test_every_stage_file_field_names_a_config_field(tmp_path):
    config = _debug_config(tmp_path, _copy_train(tmp_path))
    for spec in STAGES:
        for dotted in spec.files:
            section, *rest = dotted.split(".")
            assert hasattr(config, section), dotted
            value = getattr(config, section)
            for part in rest[:-1]:
                value = getattr(value, part)
            assert value is None or hasattr(value, rest[-1]), dotted


def test_the_fixed_file_reruns_tokenize_and_a_rerun_of_the_same_file_reuses_it(tmp_path, local_ray):
    train = _copy_train(tmp_path)
    config = _debug_config(tmp_path, train)
    first = run_pipeline(config, stages=("tokenize",)).stages["tokenize"]
    again = run_pipeline(config, stages=("tokenize",)).stages["tokenize"]
    _edit_first_row(train)
    fixed = run_pipeline(config, stages=("tokenize",)).stages["tokenize"]
    assert not first.cached and again.cached and again.directory == first.directory
    assert not fixed.cached and fixed.directory != first.directory


def test_a_truncated_manifest_means_not_done_with_a_warning_naming_it(tmp_path, caplog):
    write_manifest(tmp_path, {"stage": "score", "done": True, "outputs": {}})
    assert read_manifest(tmp_path)["done"]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    with caplog.at_level(logging.WARNING, logger="flexkd"):
        assert read_manifest(tmp_path) is None
    assert str(manifest) in caplog.text and "runs again" in caplog.text


def test_a_truncated_stage_manifest_reruns_that_stage_with_one_warning(tmp_path, local_ray, caplog):
    config = _debug_config(tmp_path, _copy_train(tmp_path))
    first = run_pipeline(config, stages=("tokenize",)).stages["tokenize"]
    manifest = first.directory / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # a crash or a full disk mid-write
    with caplog.at_level(logging.WARNING, logger="flexkd"):
        again = run_pipeline(config, stages=("tokenize",)).stages["tokenize"]
    assert not again.cached and again.directory == first.directory
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert [line for line in warnings if str(manifest) in line] == [
        next(line for line in warnings if line.startswith(f"{manifest} does not parse ("))
    ]
    assert read_manifest(first.directory)["done"]  # whole again


def test_a_manifest_is_synced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The order that makes a crash leave the old manifest or the new one, never a torn one."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        calls.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{descriptor}") else "fsync file")
        real_fsync(descriptor)

    def replace(source, target):
        calls.append(f"rename {Path(source).parent == Path(target).parent}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_manifest(tmp_path, {"done": True, "outputs": {}})
    assert calls == ["fsync file", "rename True", "fsync folder"]


def test_write_manifest_replaces_the_old_one_whole_and_leaves_no_temporary(tmp_path):
    write_manifest(tmp_path, {"done": True, "outputs": {"n": 1}})
    write_manifest(tmp_path, {"done": True, "outputs": {"n": 2}})
    assert read_manifest(tmp_path)["outputs"] == {"n": 2}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["manifest.json"]
