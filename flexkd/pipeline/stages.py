"""The pipeline's stages as data: what each one reads, which config feeds its fingerprint, and
the function that runs it. The runner knows nothing stage-specific beyond this list.

A stage is a function ``run(config, inputs, output_dir) -> outputs`` in its own file under
``stages/``, where ``inputs`` maps each upstream stage to its artifact directory and ``outputs``
(JSON-able) is recorded in the stage's ``manifest.json``. Adding a stage is that file, one entry
here and one test (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexkd.config.schema import PipelineConfig
from flexkd.models.plan import adapted_teacher_config
from flexkd.stages import adapt, distill, evaluate, generate, register, score, targets, tokenize

StageRun = Callable[[PipelineConfig, dict[str, Path], Path], dict[str, Any]]


def _always(config: PipelineConfig) -> bool:
    return True


def _nowhere(config: PipelineConfig) -> str | None:
    return None


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline.

    name             its folder under ``<artifact_root>/<pipeline>/`` and its MLflow run name
    run              the stage function
    inputs           upstream stages whose directories it reads; one that a config leaves out
                     (``enabled`` false) is not an input for that config
    config_sections  the config sections its output depends on (they feed its fingerprint)
    ignored_fields   fields inside those sections its output does not depend on
    files            the config fields naming files or folders it is the first to read; their
                     *content* feeds its fingerprint, so a file changed in place reruns it and,
                     through the input fingerprints, every stage after it
    enabled          whether a config runs this stage at all
    given            a directory that holds this stage's output already, built elsewhere (then
                     the stage does not run and has no inputs); None to build it here
    rewrites_config  how the config of a stage that reads this one changes, given this stage's
                     directory (adapt: the teacher is its adapted folder); fingerprints are
                     always computed from the config as written
    revision         raised when a change to the stage's code changes what it writes for the
                     same config, so that outputs written before the change are not reused
    """

    name: str
    run: StageRun
    inputs: tuple[str, ...] = ()
    config_sections: tuple[str, ...] = ()
    ignored_fields: Mapping[str, frozenset[str]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    enabled: Callable[[PipelineConfig], bool] = _always
    given: Callable[[PipelineConfig], str | None] = _nowhere
    rewrites_config: Callable[[PipelineConfig, Path], PipelineConfig] | None = None
    revision: int = 0


def _reads_teacher_cache(config: PipelineConfig) -> bool:
    return config.training.teacher == "cache"


def _adapts_teacher(config: PipelineConfig) -> bool:
    return config.teacher.adapt is not None


TEACHER_FILES = ("teacher.path", "teacher.tokenizer")
# The teacher fields that do not change its weights or its tokens: the adaptation reaches the stages
# after adapt through adapt's fingerprint, the competence check is the score stage's alone.
ADAPTATION = frozenset({"adapt"})
COMPETENCE = frozenset({"min_accuracy", "require_competent"})

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "generate",
        generate.run,
        # The teacher answers the train prompts only; its responses become tokenize's train split.
        config_sections=("teacher", "data", "task", "generate"),
        ignored_fields={"data": frozenset({"eval", "score", "transfer", "shard_rows"})},
        files=(*TEACHER_FILES, "data.train.path"),
        enabled=lambda config: config.generate is not None,
    ),
    StageSpec(
        "tokenize",
        tokenize.run,
        inputs=("generate",),
        config_sections=("teacher", "data", "task"),
        ignored_fields={"teacher": ADAPTATION | COMPETENCE},
        files=(*TEACHER_FILES, "data.train.path", "data.eval.path", "data.score.path", "data.transfer.path"),
    ),
    # Every stage that loads the teacher reads adapt (when enabled), so it runs with the adapted one.
    StageSpec(
        "adapt",
        adapt.run,
        inputs=("tokenize",),
        config_sections=("teacher",),
        ignored_fields={"teacher": COMPETENCE},
        files=TEACHER_FILES,
        enabled=_adapts_teacher,
        rewrites_config=adapted_teacher_config,
    ),
    StageSpec(
        "score",
        score.run,
        inputs=("tokenize", "adapt"),
        config_sections=("teacher", "student", "scoring", "selection", "layer_map"),
        # Scoring reads the student's shape (k, layer pairs), never its seed, so the seeds of a
        # comparison share one scoring pass and one teacher-target cache.
        ignored_fields={"student": frozenset({"seed"}), "teacher": ADAPTATION},
        files=(*TEACHER_FILES, "student.path"),
        # 1: a pruned student's units are ranked at every block it keeps, not the mapped ones;
        # 2: every score row is scored (Ray Train's equal split dropped rows % workers of them).
        revision=2,
    ),
    StageSpec(
        "targets",
        targets.run,
        inputs=("tokenize", "score", "adapt"),
        config_sections=("teacher", "targets"),
        ignored_fields={"teacher": ADAPTATION | COMPETENCE},
        enabled=_reads_teacher_cache,
        given=lambda config: config.targets.path,
    ),
    StageSpec(
        "distill",
        distill.run,
        inputs=("tokenize", "score", "targets", "adapt"),
        config_sections=("student", "loss", "training"),
    ),
    StageSpec("evaluate", evaluate.run, inputs=("tokenize", "distill", "adapt"), config_sections=("evaluation",)),
    StageSpec(
        "register",
        register.run,
        inputs=("score", "distill", "evaluate", "adapt"),
        config_sections=("name", "tracking"),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(spec.name for spec in STAGES)
SPECS: dict[str, StageSpec] = {spec.name: spec for spec in STAGES}
