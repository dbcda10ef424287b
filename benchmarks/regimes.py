"""The regimes of ``flexkd bench quality --regime``: how the student starts and what data it learns from.

    random-init  hidden 192, 4 layers, random weights, tied embeddings, 1,000 labeled training rows
    pruned       the same shape cut out of the teacher (``student.init: prune_from_teacher``): it
                 starts from the teacher's weights, like the paper's pretrained students; each
                 student block is paired with the teacher block it was cut from (layer_map
                 'source'), and kd+flexkd is run with three pairings of the units: ``identity``
                 (each student unit with the teacher unit it was cut from), ``importance`` and
                 ``directions``
    low-label    the random-init student, 256 labeled training rows, and the other 744 of the
                 1,000 as an unlabeled transfer set (``data.transfer``: the label column dropped)
                 that the logit and feature losses read and the task loss does not

Each regime writes its own page, ``benchmarks/results/quality-<regime>.md``, and is sized to fit
60 minutes on 2 cores with 5 seeds of its methods (where it must, with fewer steps than the
random-init regime; the page says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import SHARED_DATA

# The student of every regime: SmolLM2's head width 64, a third of the teacher's 576 units.
STUDENT_SHAPE = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "intermediate_size": 512,
}
BASELINES = ("kd+projector", "kd+projector_std", "kd")


@dataclass(frozen=True)
class Regime:
    """One regime: its default methods, what it changes in the CPU and GPU settings, and its page text."""

    name: str
    methods: tuple[str, ...]
    flexkd_methods: tuple[str, ...]  # compared against every baseline on the page
    student: str  # the page's sentence on the student and its data
    cpu: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    budget: str = ""  # the page's sentence on what was cut to fit 60 minutes on 2 cores


REGIMES: dict[str, Regime] = {
    regime.name: regime
    for regime in (
        Regime(
            name="random-init",
            methods=("kd+flexkd", "kd+flexkd-dir", "kd+projector", "kd+projector_std", "kd"),
            flexkd_methods=("kd+flexkd", "kd+flexkd-dir"),
            student="Student: the teacher's tokenizer, hidden 192, 4 layers, random init, tied embeddings.",
            budget="To fit 60 min on 2 cores with 5 seeds of 5 methods: 120 distill steps (the earlier pages ran 150).",
        ),
        Regime(
            name="pruned",
            methods=("kd+flexkd-id", "kd+flexkd", "kd+flexkd-dir", "kd+projector", "kd+projector_std", "kd"),
            flexkd_methods=("kd+flexkd-id", "kd+flexkd", "kd+flexkd-dir"),
            student="Student: cut out of the teacher (student.init prune_from_teacher, pruning scores from the "
            "scoring sentences): hidden 192 (the teacher's residual units of highest task importance), 4 of "
            "the 30 blocks spread evenly (layer_selection uniform), 3 heads in 1 key/value group, MLP 512; "
            "its output layer is the adapted teacher's, "
            "untied, cut to those units. Layer map 'source': each student block with the teacher block it "
            "was cut from. kd+flexkd-id pairs each student unit with the teacher unit it was cut from "
            "(selection identity), kd+flexkd with the teacher's most important units, kd+flexkd-dir with "
            "the teacher's coordinates on its task-gradient directions. A pruned student's weights do not "
            "depend on the seed: here a seed sets the data order (and a projector's init) only.",
            cpu={"steps": 100, "learning_rate": 5e-4, "layer_map": "source"},
            gpu={"learning_rate": 5e-4, "layer_map": "source"},
            budget="To fit 60 min on 2 cores with 5 seeds of 6 methods: 100 distill steps; a learning rate "
            "of 5e-4 (not tuned) for a student that starts from the teacher's weights.",
        ),
        Regime(
            name="low-label",
            methods=("kd+flexkd", "kd+flexkd-dir", "kd+projector", "kd+projector_std", "kd"),
            flexkd_methods=("kd+flexkd", "kd+flexkd-dir"),
            student="Student: as in random-init (hidden 192, 4 layers, random init). Only the first "
            "{labeled_rows} training sentences are labeled; the next {transfer_rows} are an unlabeled transfer "
            "set (data.transfer, written without their label column): the task loss reads the labeled rows "
            "only, the logit and feature losses every row, and each batch of {batch_size} holds "
            "{labeled_per_batch} labeled and {transfer_per_batch} unlabeled rows. The teacher was adapted on "
            "labeled rows that include the transfer rows: a teacher trained on a large labeled set, "
            "distilled through few labels and unlabeled text.",
            cpu={"labeled_rows": 256},
            gpu={"labeled_rows": 1024},
            budget="To fit 60 min on 2 cores with 5 seeds of 5 methods: 120 distill steps.",
        ),
    )
}


def regime(name: str) -> Regime:
    """The regime called ``name``; ConfigError naming the known ones otherwise."""
    if name not in REGIMES:
        from flexkd.config.schema import ConfigError

        raise ConfigError(f"--regime {name!r}: known regimes are {', '.join(REGIMES)}")
    return REGIMES[name]


def student_overrides(name: str) -> dict[str, Any]:
    """The pipeline's student section (and layer map) in regime ``name``."""
    if name == "pruned":
        # Blocks spread evenly, not chosen by their scores: a run reading the shared cache through
        # targets.path must know its layer pairs before its score stage has run.
        return {"student": {"init": "prune_from_teacher", "layer_selection": "uniform", "architecture": STUDENT_SHAPE}}
    # The adapted teacher is untied (its verbalizer rows changed); a random student keeps SmolLM2's
    # tied embeddings, as it would with the original teacher.
    return {"student": {"init": "random", "architecture": STUDENT_SHAPE | {"tie_word_embeddings": True}}}


def transfer_set_path(work_dir: Path, labeled_rows: int, train_rows: int) -> Path:
    return work_dir / "low-label" / f"train-{labeled_rows}-{train_rows}-unlabeled.tsv"


def write_transfer_set(work_dir: Path, labeled_rows: int, train_rows: int) -> Path:
    """train.tsv's rows ``labeled_rows`` .. ``train_rows`` with the sentence column only: the
    low-label regime's unlabeled transfer set (no label to read, even by mistake)."""
    from flexkd.config.schema import ConfigError

    if not 0 < labeled_rows < train_rows:
        raise ConfigError(f"low-label: {labeled_rows} labeled rows must be more than 0 and fewer than {train_rows}")
    header, *rows = (SHARED_DATA / "sst2" / "train.tsv").read_text().splitlines()
    column = header.split("\t").index("sentence")
    if len(rows) < train_rows:
        raise ConfigError(f"low-label: train.tsv has {len(rows)} rows, fewer than {train_rows}")
    path = transfer_set_path(work_dir, labeled_rows, train_rows)
    text = "\n".join(["sentence", *(row.split("\t")[column] for row in rows[labeled_rows:train_rows])]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:  # written once, then left alone
        path.write_text(text)
    return path
