"""flexkd watch: distill every new release of a registered teacher, once, and promote the student
only when it beats the champion.

The pipeline's ``teacher.path`` names a registered MLflow model: ``models:/<name>`` (every
version) or ``models:/<name>@<alias>`` (the version under the alias at each poll); ``watch.tags``
narrows it to versions carrying those tags. Each poll runs, for every such version not yet
distilled, the pipeline with the teacher pinned (``teacher.path: models:/<name>/<version>``),
here (in this process) or as a Ray job (``--address``).

Progress lives on the teacher's model version, as tags named after the pipeline (one teacher
may feed several pipelines), ``flexkd.<pipeline>.<key>``:

    status      queued -> running -> done | failed (queued again after an error, until the bound)
    attempts    runs started so far; at ``watch.max_attempts`` an unfinished version is failed
    heartbeat   UTC time a live watcher (or a poll that found its job running) last wrote
    claim       ``host:pid/nonce`` of the watcher that owns the current attempt
    run_id      the pipeline's MLflow run (when done); job_id: the Ray job (with --address)
    error       the reason of the last failed attempt, one line
    student     ``models:/<student>/<version>`` distilled from it; importance_run: its score run

Exactly once: a ``done`` or ``failed`` version is never run again. A ``running`` one whose
heartbeat is older than ``watch.stale_after_s`` was left by a watcher or job that died, and is
retried. Two watchers are kept apart by an optimistic claim: write a nonce, wait
``watch.claim_settle_s``, re-read; only the watcher that reads back its own nonce runs. (The
registry has no compare-and-set, so two claims more than ``claim_settle_s`` apart in write
latency could both win; the stages' fingerprinted directories then make the second run reuse the
first one's finished stages.) A retried run resumes the same way: same config, same stage
directories.

When a version is done, its student is compared on ``watch.metric`` with the student under the
``champion`` alias; the alias moves only if the new one is better by more than ``watch.margin``.
The decision and both numbers are tags on the new student version and metrics of its pipeline
run, as is the importance drift against the previous done release: per teacher layer, the
Jaccard overlap and the rank correlation of the selected units.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from flexkd.cluster import jobs
from flexkd.config.schema import WATCHED_TEACHER, ConfigError, PipelineConfig, load_config
from flexkd.errors import StageError
from flexkd.method.selection import selection_overlap, selection_rank_correlation
from flexkd.pipeline.runner import run_pipeline
from flexkd.tracking.runs import check_tracking_server, redact_value, tracking_uri

log = logging.getLogger("flexkd.watch")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


class WatchError(StageError):
    """The registry or the teacher model itself is unusable: nothing can be served this poll."""


class VersionError(StageError):
    """One teacher version cannot be finished (its student lacks the metric, ...); one line."""


PROGRESS_KEYS = ("status", "attempts", "heartbeat", "claim", "run_id", "job_id", "error", "student", "importance_run")


class ProgressTags:
    """The tag keys one pipeline writes on the teacher's model versions: ``keys.status`` is
    ``flexkd.<pipeline>.status``, and so on for every name in PROGRESS_KEYS."""

    def __init__(self, pipeline: str):
        for key in PROGRESS_KEYS:
            setattr(self, key, f"flexkd.{pipeline}.{key}")


@dataclass
class VersionReport:
    """What one poll found and did for one teacher version; a row of the summary."""

    version: str
    status: str
    attempts: int = 0
    note: str = ""
    failed_now: bool = False  # this poll's attempt (or registry access) failed; note says why
    student: str | None = None
    candidate: float | None = None
    champion: float | None = None
    decision: str | None = None
    drift_against: str | None = None
    drift: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class Cluster:
    """Where ``--address`` sends each version: flexkd.jobs.submit's arguments."""

    address: str
    working_dir: Path
    runtime_env: dict[str, Any] | None


def watched_teacher(config: PipelineConfig) -> tuple[str, str | None]:
    """The registered teacher model's name and alias (None: every version)."""
    if config.watch is None:
        raise ConfigError("watch: the pipeline has no watch section; add `watch: {}` to use the defaults")
    match = WATCHED_TEACHER.match(config.teacher.path)  # the config validated its form
    return match["name"], match["alias"]


def pinned_overrides(name: str, version: str) -> dict[str, Any]:
    """The config edits that pin the teacher to one version (and make the run a plain one)."""
    return {
        "teacher.path": f"models:/{name}/{version}",
        "teacher.name": name,
        "teacher.version": str(version),
        "watch": None,
    }


def promotion_metric(config: PipelineConfig) -> tuple[str, str]:
    """The compared metric and whether higher ('max') or lower ('min') is better."""
    metric = config.watch.metric or ("student.accuracy" if config.task.kind == "classification" else "student.rougeL")
    return metric, config.watch.mode or ("min" if metric.endswith("perplexity") else "max")


def is_better(candidate: float, champion: float, mode: str, margin: float) -> bool:
    """True if ``candidate`` beats ``champion`` by more than ``margin``; a NaN never wins."""
    if math.isnan(candidate):
        return False
    if math.isnan(champion):
        return True
    return candidate > champion + margin if mode == "max" else candidate < champion - margin


def timestamp(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def heartbeat_age(tags: dict[str, str], keys: ProgressTags, now: float) -> float:
    """Seconds since the heartbeat; infinite when there is none (or it cannot be read)."""
    try:
        beat = datetime.fromisoformat(tags[keys.heartbeat]).timestamp()
    except (KeyError, ValueError):
        return math.inf
    return max(0.0, now - beat)


def next_action(
    tags: dict[str, str], keys: ProgressTags, max_attempts: int, stale_after_s: float, now: float
) -> tuple[str, str]:
    """What a watcher does with a version, from its tags: ('skip' | 'run' | 'fail' | 'follow', why)."""
    status = tags.get(keys.status)
    attempts = int(tags.get(keys.attempts, "0"))
    age = heartbeat_age(tags, keys, now)
    if status in (DONE, FAILED):
        return "skip", tags.get(keys.error, "") if status == FAILED else ""
    if status == RUNNING and tags.get(keys.job_id):
        return "follow", tags[keys.job_id]
    if age < stale_after_s and (status == RUNNING or tags.get(keys.claim)):
        return "skip", f"{status or 'claimed'} by {tags.get(keys.claim, '?')} (heartbeat {age:.0f} s ago)"
    if attempts >= max_attempts:
        reason = tags.get(keys.error) or f"heartbeat stale for {age:.0f} s: its watcher or job died"
        return "fail", f"gave up after {attempts} attempt(s); last: {reason}"
    if status == RUNNING:
        return "run", f"retry: heartbeat stale for {age:.0f} s (its watcher or job died)"
    return "run", "retry" if attempts else "new"


class Watcher:
    """Polls one pipeline's teacher; :meth:`poll` serves every eligible version once."""

    def __init__(
        self,
        pipeline: Path,
        overrides: dict[str, Any] | None = None,
        cluster: Cluster | None = None,
        set_pairs: list[str] | None = None,
    ):
        self.pipeline = Path(pipeline)
        self.overrides = dict(overrides or {})
        self.set_pairs = list(set_pairs or [])  # the same overrides as text, for a Ray job's command line
        self.config = load_config(self.pipeline, self.overrides)
        self.settings = self.config.watch
        self.teacher, self.alias = watched_teacher(self.config)
        self.keys = ProgressTags(self.config.name)
        self.cluster = cluster
        self.uri = tracking_uri(self.config)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.student_model = self.config.tracking.registered_model_name or f"{self.config.name}-student"

    # ---- the registry ------------------------------------------------------------------------

    def client(self) -> MlflowClient:
        check_tracking_server(self.uri)  # seconds, not MLflow's minutes of retries
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def teacher_versions(self, client: MlflowClient) -> list[ModelVersion]:
        """The versions to serve, oldest first: READY, under the alias if any, carrying watch.tags."""
        where = redact_value(self.uri)
        try:
            client.get_registered_model(self.teacher)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise WatchError(f"watch: teacher model '{self.teacher}' is not registered in {where}") from None
            raise WatchError(f"watch: cannot read the model registry at {where}: {_first_line(error)}") from None
        if self.alias:
            try:
                versions = [client.get_model_version_by_alias(self.teacher, self.alias)]
            except MlflowException:
                raise WatchError(f"watch: teacher model '{self.teacher}' has no alias '{self.alias}'") from None
        else:
            try:
                versions = list(client.search_model_versions(f"name = '{self.teacher}'"))
            except MlflowException as error:
                raise WatchError(f"watch: cannot read the model registry at {where}: {_first_line(error)}") from None
        wanted = self.settings.tags.items()
        versions = [v for v in versions if v.status == "READY" and all(v.tags.get(k) == value for k, value in wanted)]
        return sorted(versions, key=lambda version: int(version.version))

    def tags(self, client: MlflowClient, version: str) -> dict[str, str]:
        return dict(client.get_model_version(self.teacher, version).tags)

    def set_tags(self, client: MlflowClient, version: str, **values: Any) -> None:
        for key, value in values.items():
            if value is None:
                if getattr(self.keys, key) in self.tags(client, version):
                    client.delete_model_version_tag(self.teacher, version, getattr(self.keys, key))
            else:
                client.set_model_version_tag(self.teacher, version, getattr(self.keys, key), str(value))

    def claim(self, client: MlflowClient, version: str) -> bool:
        """Write a nonce, let a concurrent claimer's write land, and keep the version only if
        the nonce read back is ours."""
        token = f"{self.owner}/{uuid.uuid4().hex[:8]}"
        try:
            self.set_tags(client, version, claim=token, heartbeat=timestamp())
        except MlflowException as error:  # e.g. SQLite: two first claims collide on a tag's unique key
            # Not a loss by itself: the claim tag may have landed before the heartbeat collided, and
            # the rival may have lost on its claim tag. Only the read-back can tell who holds it.
            log.info("teacher %s version %s: claim write collided (%s)", self.teacher, version, _first_line(error))
        time.sleep(self.settings.claim_settle_s)
        if self.tags(client, version).get(self.keys.claim) != token:
            log.info("teacher %s version %s: claimed by another watcher", self.teacher, version)
            return False
        return True

    # ---- one poll --------------------------------------------------------------------------

    def poll(self) -> list[VersionReport]:
        """Serve every eligible version once. Raises WatchError (or TrackingError) only when the
        registry or the teacher model cannot be read; a bad version is reported, not raised."""
        client = self.client()
        versions = self.teacher_versions(client)
        reports = []
        for model_version in versions:  # the backlog shows as queued before the first one runs
            if self.keys.status not in model_version.tags:
                try:
                    self.set_tags(client, str(model_version.version), status=QUEUED)
                except MlflowException as error:  # e.g. another watcher queued it in the same instant
                    log.info("version %s not marked queued: %s", model_version.version, _first_line(error))
        for model_version in versions:
            version = str(model_version.version)
            try:
                reports.append(self.serve(client, version))
            except (MlflowException, OSError) as error:  # the registry failed mid-version: say so, go on
                reports.append(VersionReport(version, "error", note=f"registry: {_first_line(error)}", failed_now=True))
        return reports

    def serve(self, client: MlflowClient, version: str) -> VersionReport:
        tags = self.tags(client, version)
        action, why = next_action(tags, self.keys, self.settings.max_attempts, self.settings.stale_after_s, time.time())
        attempts = int(tags.get(self.keys.attempts, "0"))
        if action == "skip":
            return VersionReport(
                version, tags.get(self.keys.status, QUEUED), attempts, why, student=tags.get(self.keys.student)
            )
        if action == "fail":
            self.set_tags(client, version, status=FAILED, error=why, claim=None)
            return VersionReport(version, FAILED, attempts, why, failed_now=True)
        if action == "follow":
            return self.follow_job(client, version, tags, why)
        if not self.claim(client, version):
            return VersionReport(version, RUNNING, attempts, "claimed by another watcher")
        attempts += 1
        log.info("teacher %s version %s: attempt %d (%s)", self.teacher, version, attempts, why)
        self.set_tags(
            client, version, status=RUNNING, attempts=attempts, heartbeat=timestamp(), error=None, job_id=None
        )
        if self.cluster is not None:
            return self.submit(client, version, attempts)
        return self.run_here(client, version, attempts)

    def pinned_config(self, version: str) -> PipelineConfig:
        return load_config(self.pipeline, {**self.overrides, **pinned_overrides(self.teacher, version)})

    def run_here(self, client: MlflowClient, version: str, attempts: int) -> VersionReport:

        try:
            config = self.pinned_config(version)
            with Heartbeat(self, version):
                result = run_pipeline(config)
        except ConfigError as error:  # the version itself is bad (files missing, wrong shapes): final
            return self.give_up(client, version, attempts, str(error), final=True)
        except Exception as error:
            return self.give_up(client, version, attempts, _first_line(error), final=False)
        self.set_tags(client, version, run_id=result.run_id)
        return self.finish(client, version, attempts)

    def give_up(self, client: MlflowClient, version: str, attempts: int, reason: str, final: bool) -> VersionReport:
        """End a failed attempt: queued for a retry, or failed for good (bad input, or the bound)."""
        status = FAILED if final or attempts >= self.settings.max_attempts else QUEUED
        self.set_tags(client, version, status=status, error=reason, claim=None)
        log.error("teacher %s version %s: attempt %d failed: %s", self.teacher, version, attempts, reason)
        return VersionReport(version, status, attempts, reason, failed_now=True)

    # ---- a Ray cluster ---------------------------------------------------------------------

    def submit(self, client: MlflowClient, version: str, attempts: int) -> VersionReport:

        config = self.pinned_config(version)
        pairs = self.set_pairs + [
            f"{key}={json.dumps(value)}" for key, value in pinned_overrides(self.teacher, version).items()
        ]
        try:
            jobs.submit(
                self.cluster.address,
                self.pipeline,
                config,
                pairs,
                self.cluster.working_dir,
                self.cluster.runtime_env,
                wait=False,
            )
            latest = jobs.latest_attempt(jobs.connect(self.cluster.address), jobs.submission_id(config))
        except (ConfigError, StageError) as error:
            return self.give_up(client, version, attempts, _first_line(error), final=isinstance(error, ConfigError))
        self.set_tags(client, version, job_id=latest.submission_id, heartbeat=timestamp())
        return VersionReport(version, RUNNING, attempts, f"submitted job {latest.submission_id}")

    def follow_job(self, client: MlflowClient, version: str, tags: dict[str, str], job_id: str) -> VersionReport:
        """A version whose Ray job this or another watcher submitted: ask the cluster how it went."""
        attempts = int(tags.get(self.keys.attempts, "0"))
        if self.cluster is None:  # cannot ask: trust the heartbeat that polls of the job refresh
            age = heartbeat_age(tags, self.keys, time.time())
            return VersionReport(version, RUNNING, attempts, f"job {job_id} (heartbeat {age:.0f} s ago)")

        try:
            info = jobs.connect(self.cluster.address).get_job_info(job_id)
        except RuntimeError:  # the cluster no longer knows the job: treat it as dead
            return self.give_up(
                client, version, attempts, f"job {job_id} is unknown to {self.cluster.address}", final=False
            )
        state = info.status.value
        if state in ("PENDING", "RUNNING"):
            self.set_tags(client, version, heartbeat=timestamp())
            return VersionReport(version, RUNNING, attempts, f"job {job_id} {state}")
        if state == "SUCCEEDED":
            return self.finish(client, version, attempts)
        reason = f"job {job_id} {state}: {_first_line(info.message or 'no message')}"
        report = self.give_up(client, version, attempts, reason, final=False)
        self.set_tags(client, version, job_id=None)
        return report

    # ---- a finished version ----------------------------------------------------------------

    def finish(self, client: MlflowClient, version: str, attempts: int) -> VersionReport:
        """Find the student, promote it if better, log the drift, and mark the version done."""
        try:
            student = self.student_of(client, version)
            report = VersionReport(version, DONE, attempts, student=f"models:/{self.student_model}/{student.version}")
            importance_run = student.tags.get("flexkd.importance_run", "")
            self.promote(client, student, report)
            try:
                self.log_drift(client, version, importance_run, report)
            except (MlflowException, OSError, KeyError, ValueError) as error:  # a diagnostic: never fails a version
                report.note = f"drift not computed: {_first_line(error)}"
                log.warning("teacher %s version %s: %s", self.teacher, version, report.note)
            self.log_to_pipeline_run(client, student, report)
        except (VersionError, MlflowException, OSError) as error:
            return self.give_up(client, version, attempts, _first_line(error), final=isinstance(error, VersionError))
        self.set_tags(
            client,
            version,
            status=DONE,
            student=report.student,
            importance_run=importance_run,
            heartbeat=timestamp(),
            claim=None,
        )
        log.info("teacher %s version %s: done, student %s (%s)", self.teacher, version, report.student, report.decision)
        return report

    def student_of(self, client: MlflowClient, version: str) -> ModelVersion:
        """The newest student this pipeline registered from this teacher version."""
        lineage = {
            "flexkd.teacher.name": self.teacher,
            "flexkd.teacher.version": str(version),
            "flexkd.pipeline": self.config.name,
        }
        found = [
            v
            for v in client.search_model_versions(f"name = '{self.student_model}'")
            if all(v.tags.get(key) == value for key, value in lineage.items())
        ]
        if not found:
            raise VersionError(
                f"the run finished but no version of {self.student_model} is tagged with teacher "
                f"{self.teacher} version {version}"
            )
        return max(found, key=lambda v: int(v.version))

    def promote(self, client: MlflowClient, student: ModelVersion, report: VersionReport) -> None:
        metric, mode = promotion_metric(self.config)
        alias, margin = self.settings.champion_alias, self.settings.margin
        report.candidate = _metric(student, metric)
        try:
            champion = client.get_model_version_by_alias(self.student_model, alias)
        except MlflowException:
            champion = None
        if champion is not None and str(champion.version) == str(student.version):
            report.champion, report.decision = report.candidate, "already champion"
        elif champion is None:
            report.decision = f"promoted (no {alias} yet)"
        else:
            try:
                report.champion = _metric(champion, metric)
            except VersionError:  # a champion registered by other means: it has no number to defend
                report.champion = math.nan
            better = is_better(report.candidate, report.champion, mode, margin)
            report.decision = (
                f"promoted over {alias} v{champion.version}"
                if better
                else f"kept {alias} v{champion.version} (not better by > {margin:g})"
            )
        if report.decision.startswith("promoted"):
            client.set_registered_model_alias(self.student_model, alias, str(student.version))
        tags = {
            "flexkd.promotion.decision": report.decision,
            "flexkd.promotion.metric": f"{metric} ({mode})",
            "flexkd.promotion.margin": str(margin),
            "flexkd.promotion.candidate": str(report.candidate),
            "flexkd.promotion.champion": "" if report.champion is None else str(report.champion),
            "flexkd.promotion.champion_version": "" if champion is None else str(champion.version),
        }
        for key, value in tags.items():
            client.set_model_version_tag(self.student_model, student.version, key, value)
        log.info(
            "%s v%s: %s = %s, %s = %s: %s",
            self.student_model,
            student.version,
            metric,
            report.candidate,
            alias,
            report.champion,
            report.decision,
        )

    def log_drift(self, client: MlflowClient, version: str, importance_run: str, report: VersionReport) -> None:
        """Per teacher layer, how the selected units moved since the previous done release."""
        previous = [
            v
            for v in client.search_model_versions(f"name = '{self.teacher}'")
            if int(v.version) < int(version)
            and v.tags.get(self.keys.status) == DONE
            and v.tags.get(self.keys.importance_run)
        ]
        if not previous or not importance_run:
            return
        before = max(previous, key=lambda v: int(v.version))
        report.drift_against = str(before.version)
        report.drift = importance_drift(
            self.selected_units(before.tags[self.keys.importance_run]), self.selected_units(importance_run)
        )

    def selected_units(self, run_id: str) -> dict[str, Any]:

        with tempfile.TemporaryDirectory() as folder:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="selected.json", dst_path=folder, tracking_uri=self.uri
            )
            return json.loads(Path(path).read_text())

    def log_to_pipeline_run(self, client: MlflowClient, student: ModelVersion, report: VersionReport) -> None:
        """The decision, both numbers and the drift, as metrics of the pipeline run that made the student."""
        parent = client.get_run(student.run_id).data.tags.get("mlflow.parentRunId", student.run_id)
        metrics = {
            "promotion.candidate": report.candidate,
            "promotion.promoted": float(report.decision.startswith("promoted")),
        }
        if report.champion is not None:
            metrics["promotion.champion"] = report.champion
        for layer, (jaccard, rho) in report.drift.items():
            metrics[f"drift.layer_{layer}.jaccard"], metrics[f"drift.layer_{layer}.spearman"] = jaccard, rho
        for key, value in metrics.items():
            client.log_metric(parent, key, value)
        client.set_tag(parent, "flexkd.promotion", report.decision)
        if report.drift_against is not None:
            client.set_tag(parent, "flexkd.drift.previous_teacher_version", report.drift_against)


def importance_drift(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per teacher layer in both ``selected.json`` files: (Jaccard overlap, Spearman rho) of the
    selected units. Layers only one release scored, or of another width, are left out."""
    drift = {}
    for layer in sorted(set(before["layers"]) & set(after["layers"]), key=int):
        old, new = before["layers"][layer], after["layers"][layer]
        if old.get("d_teacher") != new.get("d_teacher"):
            continue  # a resized teacher: unit j is not the same unit any more
        if "indices" not in old or "indices" not in new:
            continue  # selection.method directions pairs no units
        old_units, new_units = torch.tensor(old["indices"]), torch.tensor(new["indices"])
        drift[layer] = (selection_overlap(old_units, new_units), selection_rank_correlation(old_units, new_units))
    return drift


def _metric(student: ModelVersion, metric: str) -> float:
    value = student.tags.get(f"metric.{metric}")
    if value is None:
        known = sorted(key.removeprefix("metric.") for key in student.tags if key.startswith("metric."))
        raise VersionError(
            f"watch.metric: '{metric}' is not among {student.name} v{student.version}'s metrics "
            f"({', '.join(known) or 'none'})"
        )
    return float(value)


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Heartbeat:
    """Refreshes the version's heartbeat tag every ``watch.heartbeat_s`` while the pipeline runs.
    A missed beat is only logged: the run matters more than the tag."""

    def __init__(self, watcher: Watcher, version: str):
        self.watcher, self.version = watcher, version
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{version}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        client = MlflowClient(tracking_uri=self.watcher.uri, registry_uri=self.watcher.uri)
        while not self.stopped.wait(self.watcher.settings.heartbeat_s):
            try:
                self.watcher.set_tags(client, self.version, heartbeat=timestamp())
            except Exception as error:
                log.warning("heartbeat of version %s not written: %s", self.version, _first_line(error))


def summary(watcher: Watcher, reports: list[VersionReport]) -> str:
    """The table printed after each poll."""
    metric, mode = promotion_metric(watcher.config)
    which = f"@{watcher.alias}" if watcher.alias else "every version"
    lines = [f"watch {watcher.config.name}: teacher {watcher.teacher} ({which}) in {redact_value(watcher.uri)}", ""]
    if not reports:
        return "\n".join([*lines, "no teacher version to serve"])
    lines += [
        f"| teacher version | status | attempts | student | {metric} | {watcher.settings.champion_alias} "
        "| decision | drift vs previous (layer: jaccard / spearman) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        drift = "; ".join(f"layer {layer}: {jaccard:.2f} / {rho:.2f}" for layer, (jaccard, rho) in report.drift.items())
        if report.drift_against:
            drift = f"vs v{report.drift_against}: {drift}"
        lines.append(
            f"| {report.version} | {report.status} | {report.attempts} | {report.student or ''} "
            f"| {_number(report.candidate)} | {_number(report.champion)} | {report.decision or ''} "
            f"| {drift} | {report.note} |"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def watch(watcher: Watcher, once: bool, interval_s: float) -> int:
    """Poll once (exit 1 if anything failed) or forever (errors are printed and the next poll tries again)."""
    try:
        while True:
            problems = poll_and_report(watcher)
            if once:
                return 1 if problems else 0
            time.sleep(interval_s)
    except KeyboardInterrupt:
        print("flexkd: watch stopped; a version it was running is retried once its heartbeat is stale", file=sys.stderr)
        return 130


def poll_and_report(watcher: Watcher) -> list[str]:
    """One poll: the summary on stdout, one line per problem on stderr; returns the problems."""
    try:
        reports = watcher.poll()
        print(summary(watcher, reports), flush=True)
        problems = [f"watch: teacher {watcher.teacher} version {r.version}: {r.note}" for r in reports if r.failed_now]
    except StageError as error:  # the registry or the teacher model: nothing was served
        problems = [str(error)]
    except MlflowException as error:
        problems = [f"watch: the model registry at {redact_value(watcher.uri)}: {_first_line(error)}"]
    for problem in problems:
        print(f"flexkd: {problem}", file=sys.stderr, flush=True)
    return problems
