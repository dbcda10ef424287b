"""flexkd watch against a real SQLite MLflow registry: tiny random teachers registered as versions
of one model, the debug pipeline distilling each through a real local Ray. No mocks, but for one
injected fault: test_a_claim_whose_heartbeat_write_collides_is_decided_by_reading_it_back patches
Watcher.set_tags to make the heartbeat write collide after the claim tag landed, a race SQLite
gives only now and then (its writes still go to the real registry).

The registry-only tests (claims, version selection, promotion, errors) need no Ray and take seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from test_cluster import cluster  # noqa: F401 - the two-node cluster fixture, for the --address test

from flexkd.cli import main
from flexkd.config.schema import ConfigError, apply_overrides, load_config
from flexkd.method.selection import selection_rank_correlation
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer
from flexkd.tracking.model_registry import log_student
from flexkd.watch.watcher import (
    ProgressTags,
    VersionError,
    VersionReport,
    Watcher,
    WatchError,
    importance_drift,
    is_better,
    next_action,
    summary,
    timestamp,
)

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
TEACHER = "tiny-teacher"
STUDENT = "debug-student"
KEYS = ProgressTags("debug")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def store_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


def watched_pipeline(root: Path, watch: dict | None = None, **overrides) -> Path:
    """The debug pipeline watching every version of ``tiny-teacher``, everything under ``root``."""
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw,
        {
            "artifact_root": str(root),
            "tracking.tracking_uri": store_uri(root),
            "teacher": {"source": "mlflow", "path": f"models:/{TEACHER}"},
            "watch": {"claim_settle_s": 0.2, **(watch or {})},
            **overrides,
        },
    )
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def client_for(root: Path, uri: str | None = None) -> MlflowClient:
    uri = uri or store_uri(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_teacher(root: Path, seed: int, uri: str | None = None) -> str:
    """A tiny random Llama (the debug teacher's shape) with the tiny tokenizer, logged as a flexkd
    model and registered as the next version of ``tiny-teacher`` in ``uri`` (default: the SQLite
    store under ``root``); returns the version."""
    uri = uri or store_uri(root)
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    architecture = load_config(PIPELINES / "debug.yaml").teacher.architecture
    model = build_random_model(
        {"model_type": "llama", **architecture},
        vocab_size=len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = root / f"teacher-seed{seed}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name("teachers")
        experiment_id = (
            experiment.experiment_id
            if experiment
            else mlflow.create_experiment("teachers", artifact_location=(root / "teacher-artifacts").as_uri())
        )
        with mlflow.start_run(experiment_id=experiment_id):
            logged = log_student(folder, max_new_tokens=8)
        return str(mlflow.register_model(logged.model_uri, TEACHER).version)
    finally:
        mlflow.set_tracking_uri(None)


def dummy_version(client: MlflowClient, root: Path, name: str, tags: dict[str, str] | None = None) -> str:
    """A registered version with no model behind it: enough for the registry-only tests."""
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(name)
    (root / "empty").mkdir(exist_ok=True)
    return str(client.create_model_version(name, source=str(root / "empty"), tags=tags or {}).version)


def students(client: MlflowClient):
    return sorted(client.search_model_versions(f"name = '{STUDENT}'"), key=lambda v: int(v.version))


def one_line_err(captured) -> str:
    """The one ``flexkd:`` line on stderr. After a pipeline ran in this process, Ray's progress bars
    (ray.experimental.tqdm_ray patches print) may put cursor escapes before a printed line: dropped."""
    text = ANSI_ESCAPE.sub("", captured.readouterr().err)
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("flexkd:")]
    assert len(lines) == 1, (lines, text[-3000:])
    return lines[0]


# ---- pure parts --------------------------------------------------------------------------------


def test_rank_correlation_of_selections_matches_spearman_over_the_union():
    stats = pytest.importorskip("scipy.stats")
    same = torch.tensor([5, 1, 9, 3])
    assert selection_rank_correlation(same, same) == pytest.approx(1.0)
    assert selection_rank_correlation(same, same.flip(0)) == pytest.approx(-1.0)
    a, b = torch.tensor([4, 0, 7, 2, 9]), torch.tensor([0, 4, 8, 2, 5])
    union = sorted(set(a.tolist()) | set(b.tolist()))
    # scipy ranks the positions itself, averaging the tie of the units a selection leaves out.
    positions = [[s.tolist().index(u) if u in s.tolist() else len(union) for u in union] for s in (a, b)]
    expected = stats.spearmanr(*positions).statistic
    assert selection_rank_correlation(a, b) == pytest.approx(expected, abs=1e-12)
    assert selection_rank_correlation(torch.tensor([1, 2]), torch.tensor([3, 4])) < 0  # disjoint: opposite
    assert selection_rank_correlation(torch.tensor([3]), torch.tensor([3])) == 1.0


def test_importance_drift_is_per_shared_layer_and_skips_a_resized_teacher():
    before = {
        "layers": {
            "2": {"indices": [0, 1, 2], "d_teacher": 8},
            "4": {"indices": [3, 4, 5], "d_teacher": 8},
            "6": {"indices": [1], "d_teacher": 8},
        }
    }
    after = {"layers": {"2": {"indices": [2, 1, 0], "d_teacher": 8}, "4": {"indices": [3, 6, 7], "d_teacher": 16}}}
    drift = importance_drift(before, after)
    assert list(drift) == ["2"]
    assert drift["2"] == (pytest.approx(1.0), pytest.approx(-1.0))


def test_promotion_needs_a_margin_and_a_number():
    assert is_better(0.8, 0.7, "max", 0.0) and not is_better(0.7, 0.7, "max", 0.0)
    assert not is_better(0.75, 0.7, "max", 0.1) and is_better(0.85, 0.7, "max", 0.1)
    assert is_better(9.0, 10.0, "min", 0.5) and not is_better(9.8, 10.0, "min", 0.5)
    assert not is_better(float("nan"), 0.1, "max", 0.0) and is_better(0.1, float("nan"), "max", 0.0)


def test_next_action_follows_the_progress_tags():
    now = time.time()
    fresh, stale = timestamp(now - 1), timestamp(now - 100)

    def action(**tags):
        return next_action({getattr(KEYS, key): value for key, value in tags.items()}, KEYS, 2, 10.0, now)[0]

    assert action() == "run"
    assert action(status="queued") == "run"
    assert action(status="done") == action(status="failed") == "skip"
    assert action(status="running", heartbeat=fresh, attempts="1") == "skip"  # another watcher is on it
    assert action(status="queued", claim="h:1/x", heartbeat=fresh) == "skip"  # being claimed right now
    assert action(status="running", heartbeat=stale, attempts="1") == "run"  # its watcher died: retry
    assert action(status="running", heartbeat=stale, attempts="2") == "fail"  # the bound
    assert action(status="running", heartbeat=fresh, attempts="1", job_id="flexkd-debug-x") == "follow"


def test_watch_section_needs_a_registered_teacher_and_a_sane_heartbeat(tmp_path):
    with pytest.raises(ConfigError, match="watch: needs teacher.source 'mlflow'"):
        load_config(PIPELINES / "debug.yaml", {"watch": {}})
    with pytest.raises(ConfigError, match="not a version"):
        load_config(watched_pipeline(tmp_path), {"teacher.path": f"models:/{TEACHER}/3"})
    with pytest.raises(ConfigError, match="stale_after_s"):
        load_config(watched_pipeline(tmp_path), {"watch.heartbeat_s": 60, "watch.stale_after_s": 90})
    aliased = load_config(watched_pipeline(tmp_path), {"teacher.path": f"models:/{TEACHER}@release"})
    assert aliased.watch.max_attempts == 3
    shipped = load_config(PIPELINES / "sst2_watch.yaml")
    assert shipped.watch.tags == {"stage": "release"} and shipped.teacher.path == "models:/sst2-teacher"


# ---- the registry, no Ray ------------------------------------------------------------------------


def test_versions_are_chosen_by_alias_or_tags(tmp_path):
    client = client_for(tmp_path)
    for tags in ({"stage": "release"}, {}, {"stage": "release"}):
        dummy_version(client, tmp_path, TEACHER, tags)
    client.set_registered_model_alias(TEACHER, "release", "2")
    every = Watcher(watched_pipeline(tmp_path))
    assert [str(v.version) for v in every.teacher_versions(every.client())] == ["1", "2", "3"]
    tagged = Watcher(watched_pipeline(tmp_path, watch={"tags": {"stage": "release"}}))
    assert [str(v.version) for v in tagged.teacher_versions(tagged.client())] == ["1", "3"]
    aliased = Watcher(watched_pipeline(tmp_path), {"teacher.path": f"models:/{TEACHER}@release"})
    assert [str(v.version) for v in aliased.teacher_versions(aliased.client())] == ["2"]
    missing = Watcher(watched_pipeline(tmp_path), {"teacher.path": f"models:/{TEACHER}@nightly"})
    with pytest.raises(WatchError, match=f"teacher model '{TEACHER}' has no alias 'nightly'"):
        missing.teacher_versions(missing.client())


def test_a_claim_whose_heartbeat_write_collides_is_decided_by_reading_it_back(tmp_path, monkeypatch):
    """The race the test below hits now and then on SQLite: this claim's tag lands, then its
    heartbeat collides with the rival's insert. Giving up there let both watchers lose."""
    from mlflow.exceptions import MlflowException

    client = client_for(tmp_path)
    version = dummy_version(client, tmp_path, TEACHER)
    watcher = Watcher(watched_pipeline(tmp_path, watch={"claim_settle_s": 0.0}))
    write = watcher.set_tags

    def claim_lands_heartbeat_collides(client, version, **values):
        write(client, version, claim=values["claim"])
        raise MlflowException("UNIQUE constraint failed: model_version_tags.key")

    monkeypatch.setattr(watcher, "set_tags", claim_lands_heartbeat_collides)
    assert watcher.claim(watcher.client(), version) is True


@pytest.mark.parametrize("left_behind", [False, True], ids=["first-claim", "over-a-dead-watchers-claim"])
def test_two_watchers_racing_for_a_version_do_not_both_win(tmp_path, left_behind):
    client = client_for(tmp_path)
    version = dummy_version(client, tmp_path, TEACHER)
    if left_behind:  # the tags exist, so both claims update them: the settle-and-re-read decides
        for key, value in {
            KEYS.status: "running",
            KEYS.attempts: "1",
            KEYS.claim: "dead-host:9/0",
            KEYS.heartbeat: timestamp(time.time() - 3600),
        }.items():
            client.set_model_version_tag(TEACHER, version, key, value)
    pipeline = watched_pipeline(tmp_path, watch={"claim_settle_s": 1.0})
    watchers = [Watcher(pipeline), Watcher(pipeline)]
    watchers[1].owner = "other-host:1"
    start, won = threading.Barrier(2), {}

    def race(index: int) -> None:
        watcher = watchers[index]
        start.wait()
        won[index] = watcher.claim(watcher.client(), version)

    threads = [threading.Thread(target=race, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won.values()) == [False, True]
    winner = watchers[[index for index, ok in won.items() if ok][0]]
    assert client.get_model_version(TEACHER, version).tags[KEYS.claim].startswith(winner.owner + "/")
    # Once it is claimed, a third look sees the fresh claim and keeps off.
    report = Watcher(pipeline).serve(client, version)
    assert report.note.startswith(("claimed by ", "running by ")[left_behind] + winner.owner), report


def test_the_champion_alias_moves_only_to_a_better_student(tmp_path):
    client = client_for(tmp_path)
    watcher = Watcher(watched_pipeline(tmp_path, watch={"margin": 0.05}))

    def promote(accuracy: float) -> tuple[VersionReport, str]:
        version = dummy_version(client, tmp_path, STUDENT, {"metric.student.accuracy": str(accuracy)})
        report = VersionReport(version, "done")
        watcher.promote(client, client.get_model_version(STUDENT, version), report)
        return report, str(client.get_model_version_by_alias(STUDENT, "champion").version)

    first, champion = promote(0.5)
    assert champion == "1" and first.decision == "promoted (no champion yet)"
    within_margin, champion = promote(0.54)
    assert champion == "1" and within_margin.decision.startswith("kept champion v1")
    better, champion = promote(0.6)
    assert champion == "3" and better.decision == "promoted over champion v1"
    tags = client.get_model_version(STUDENT, "3").tags
    assert (
        tags["flexkd.promotion.candidate"],
        tags["flexkd.promotion.champion"],
        tags["flexkd.promotion.champion_version"],
    ) == ("0.6", "0.5", "1")
    assert client.get_model_version(STUDENT, "2").tags["flexkd.promotion.decision"].startswith("kept")

    unknown = Watcher(watched_pipeline(tmp_path, watch={"metric": "student.bleu"}))
    with pytest.raises(VersionError) as caught:
        unknown.promote(client, client.get_model_version(STUDENT, "3"), VersionReport("3", "done"))
    assert str(caught.value) == (f"watch.metric: 'student.bleu' is not among {STUDENT} v3's metrics (student.accuracy)")
    assert str(client.get_model_version_by_alias(STUDENT, "champion").version) == "3"


def test_the_summary_shows_each_version_the_decision_and_the_drift(tmp_path):
    watcher = Watcher(watched_pipeline(tmp_path))
    table = summary(
        watcher,
        [
            VersionReport("1", "failed", 3, "gave up after 3 attempt(s)"),
            VersionReport(
                "2",
                "done",
                1,
                student=f"models:/{STUDENT}/4",
                candidate=0.71875,
                champion=0.6875,
                decision="promoted over champion v3",
                drift_against="1",
                drift={"2": (0.5, 0.25), "4": (1 / 3, -0.125)},
            ),
        ],
    ).splitlines()
    assert table[0] == f"watch debug: teacher {TEACHER} (every version) in {store_uri(tmp_path)}"
    assert table[2].startswith("| teacher version | status | attempts | student | student.accuracy | champion |")
    assert table[4] == "| 1 | failed | 3 |  |  |  |  |  | gave up after 3 attempt(s) |"
    assert table[5] == (
        f"| 2 | done | 1 | models:/{STUDENT}/4 | 0.7188 | 0.6875 | promoted over champion v3 "
        "| vs v1: layer 2: 0.50 / 0.25; layer 4: 0.33 / -0.12 |  |"
    )
    assert summary(watcher, [])[-len("no teacher version to serve") :] == "no teacher version to serve"


def test_an_unreachable_registry_is_one_line(tmp_path, capsys):
    pipeline = watched_pipeline(tmp_path, **{"tracking.tracking_uri": "http://alice:s3cret@127.0.0.1:9"})
    started = time.monotonic()
    assert main(["watch", str(pipeline), "--once"]) == 1
    assert time.monotonic() - started < 30
    assert one_line_err(capsys) == (
        "flexkd: tracking: cannot reach the MLflow tracking server at "
        "http://alice:***@127.0.0.1:9: Connection refused; start it, or fix "
        "tracking.tracking_uri / MLFLOW_TRACKING_URI"
    )


def test_a_teacher_that_is_not_registered_is_one_line(tmp_path, capsys):
    pipeline = watched_pipeline(tmp_path, **{"teacher.path": "models:/no-such-teacher"})
    assert main(["watch", str(pipeline), "--once"]) == 1
    assert one_line_err(capsys) == (
        f"flexkd: watch: teacher model 'no-such-teacher' is not registered in {store_uri(tmp_path)}"
    )


# ---- end to end, through a real local Ray ----------------------------------------------------


def _selected(client: MlflowClient, student) -> dict:
    run_id = student.tags["flexkd.importance_run"]
    return json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="selected.json", tracking_uri=client.tracking_uri
            )
        ).read_text()
    )


def _pipeline_run(client: MlflowClient, student):
    return client.get_run(client.get_run(student.run_id).data.tags["mlflow.parentRunId"])


# The debug pipeline, smaller still: each release costs a whole pipeline run through Ray.
SMALL = {
    "data.train.limit": 64,
    "data.eval.limit": 16,
    "training.steps": 8,
    "training.log_every": 4,
    "training.checkpoint_every": 4,
}


@pytest.mark.slow  # two full pipeline runs, ~3 min on a quiet 2-core machine: `make test-slow`
def test_each_release_gets_one_student_the_better_is_champion_and_a_broken_one_is_one_line(tmp_path, local_ray, capfd):
    pipeline, client = watched_pipeline(tmp_path, **SMALL), client_for(tmp_path)
    register_teacher(tmp_path, seed=1)
    register_teacher(tmp_path, seed=2)  # a release whose files are gone
    shutil.rmtree(urlsplit(client.get_model_version_download_uri(TEACHER, "2")).path)

    assert main(["watch", str(pipeline), "--once"]) == 1  # release 1 served, release 2 failed
    line = one_line_err(capfd)
    assert line.startswith(f"flexkd: watch: teacher {TEACHER} version 2: teacher.path: models:/{TEACHER}/2: "), line
    broken = client.get_model_version(TEACHER, "2").tags
    assert broken[KEYS.status] == "failed" and broken[KEYS.error] in line

    register_teacher(tmp_path, seed=3)
    assert main(["watch", str(pipeline), "--once"]) == 0  # release 3 served; release 2 is not retried
    summary = capfd.readouterr().out
    assert client.get_model_version(TEACHER, "2").tags[KEYS.attempts] == "1"

    found = students(client)
    assert [v.tags["flexkd.teacher.version"] for v in found] == ["1", "3"]
    assert all(v.tags["flexkd.teacher.name"] == TEACHER for v in found)
    first, second = found
    scores = [float(v.tags["metric.student.accuracy"]) for v in found]
    champion = client.get_model_version_by_alias(STUDENT, "champion")
    assert str(champion.version) == str((second if scores[1] > scores[0] else first).version)
    assert second.tags["flexkd.promotion.decision"].startswith("promoted" if scores[1] > scores[0] else "kept")
    assert float(second.tags["flexkd.promotion.candidate"]) == scores[1]
    assert float(second.tags["flexkd.promotion.champion"]) == scores[0]
    for teacher_version, student in zip(("1", "3"), found):
        tags = client.get_model_version(TEACHER, teacher_version).tags
        assert tags[KEYS.status] == "done" and tags[KEYS.attempts] == "1"
        assert tags[KEYS.student] == f"models:/{STUDENT}/{student.version}"

    # The drift of release 3 against release 1 (the previous done one), per mapped teacher layer,
    # is what the two selections say; release 1 had nothing to drift from.
    expected = importance_drift(_selected(client, first), _selected(client, second))
    assert list(expected) == ["2", "4"]
    logged = _pipeline_run(client, second).data.metrics
    for layer, (jaccard, rho) in expected.items():
        assert logged[f"drift.layer_{layer}.jaccard"] == pytest.approx(jaccard)
        assert logged[f"drift.layer_{layer}.spearman"] == pytest.approx(rho)
    assert logged["promotion.candidate"] == scores[1] and logged["promotion.champion"] == scores[0]
    assert not [key for key in _pipeline_run(client, first).data.metrics if key.startswith("drift.")]
    assert f"vs v1: layer 2: {expected['2'][0]:.2f} / {expected['2'][1]:.2f}; layer 4: " in summary
    print(summary)  # shown with -s: the summary the README quotes


def _wait_for(pattern: str, root: Path, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sorted(root.glob(pattern)):
            return
        assert process.poll() is None, f"the watcher ended (rc {process.returncode}) before {pattern} appeared"
        time.sleep(0.2)
    raise AssertionError(f"{pattern} did not appear within {timeout} s")


@pytest.mark.slow  # two partial pipeline runs, ~5 min on the shared 2-core machine
def test_a_watcher_killed_midway_is_retried_once_and_then_left_alone(tmp_path, local_ray):
    watch = {"heartbeat_s": 0.5, "stale_after_s": 3.0}
    pipeline = watched_pipeline(
        tmp_path, watch=watch, **{"training.steps": 60, "training.checkpoint_every": 10, "training.log_every": 10}
    )
    client = client_for(tmp_path)
    register_teacher(tmp_path, seed=1)

    # The watcher runs as its own process on the test's Ray and is killed with SIGKILL once
    # distill has written a checkpoint: it cannot mark anything.
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    process = subprocess.Popen(
        [sys.executable, "-m", "flexkd.cli", "watch", str(pipeline), "--once"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for("debug/distill/*/checkpoints/step_*/meta.json", tmp_path, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    tags = client.get_model_version(TEACHER, "1").tags
    assert (tags[KEYS.status], tags[KEYS.attempts]) == ("running", "1")
    assert students(client) == []

    time.sleep(watch["stale_after_s"] + 0.5)  # the dead watcher's heartbeat goes stale
    assert main(["watch", str(pipeline), "--once"]) == 0
    tags = client.get_model_version(TEACHER, "1").tags
    assert (tags[KEYS.status], tags[KEYS.attempts]) == ("done", "2")
    [student] = students(client)
    distill = json.loads(next((tmp_path / "debug" / "distill").glob("*/manifest.json")).read_text())
    assert distill["outputs"]["resumed_from_step"] >= 10 and distill["outputs"]["steps"] == 60

    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert main(["watch", str(pipeline), "--once"]) == 0
    assert [v.version for v in students(client)] == [student.version]
    assert client.get_model_version(TEACHER, "1").tags[KEYS.attempts] == "2"
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs


# ---- with --address: each release is a Ray job on a real two-node cluster ------------------------


@pytest.mark.slow
def test_with_an_address_each_release_is_a_ray_job_that_a_later_poll_finishes(cluster):  # noqa: F811 - the fixture imported above
    from test_cluster import DEBUG, JOB_TIMEOUT_S, _flexkd

    root = cluster.shared / "watch"  # artifact_root, on the nodes' shared storage
    root.mkdir(parents=True)
    register_teacher(root, seed=1, uri=cluster.mlflow)  # the registry: the cluster's MLflow server
    client = client_for(root, cluster.mlflow)
    watch = [
        "watch",
        str(DEBUG),
        "--once",
        "--address",
        cluster.address,
        "--set",
        f"artifact_root={root}",
        "--set",
        f"tracking.tracking_uri={cluster.mlflow}",
        "--set",
        "teacher.source=mlflow",
        "--set",
        f"teacher.path=models:/{TEACHER}",
        "--set",
        "teacher.architecture=null",
        "--set",
        "watch={claim_settle_s: 0.2}",
    ]
    first = _flexkd(cluster.env, *watch)
    assert first.returncode == 0, first.stderr[-3000:]
    tags = client.get_model_version(TEACHER, "1").tags
    assert tags[KEYS.status] == "running" and tags[KEYS.job_id].startswith("flexkd-debug-")

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while tags[KEYS.status] == "running":  # cron's later ticks: each follows the job, the last finishes it
        assert time.monotonic() < deadline, tags
        time.sleep(10)
        poll = _flexkd(cluster.env, *watch)
        assert poll.returncode == 0, poll.stderr[-3000:]
        tags = client.get_model_version(TEACHER, "1").tags
    assert (tags[KEYS.status], tags[KEYS.attempts]) == ("done", "1")
    [student] = students(client)
    assert student.tags["flexkd.teacher.version"] == "1"
    assert str(client.get_model_version_by_alias(STUDENT, "champion").version) == str(student.version)
