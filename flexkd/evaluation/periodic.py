"""The student's metrics on the eval split while it trains: what a Tune trial reports and ASHA
compares. The metrics are the evaluate stage's (accuracy and macro-F1, or ROUGE-L and perplexity);
classification reads the verbalizer logits at the last prompt token only, which makes a periodic
evaluation cheap next to the steps it interrupts."""

from __future__ import annotations

from pathlib import Path

import torch

from flexkd import distributed
from flexkd.config.schema import PipelineConfig
from flexkd.data.rows import collate_batch
from flexkd.evaluation.metrics import TOKEN_COLUMNS, generate_and_score, macro_f1, read_eval_rows
from flexkd.method.objective import class_logits, forward_scored
from flexkd.models.plan import build_student, load_pipeline_tokenizer

EVAL_METRICS = {"classification": ("accuracy", "macro_f1"), "generation": ("rougeL", "perplexity")}


class StudentEvaluator:
    """The student's metrics on the eval split (those of the evaluate stage), the same on every rank."""

    def __init__(
        self,
        config: PipelineConfig,
        device: torch.device,
        eval_dir: Path,
        pad_token_id: int,
        verbalizer_ids: list[int] | None,
        score_dir: Path | None,
    ):
        """eval_dir: the tokenize stage's eval rows; score_dir: where a pruned student's starting weights are."""
        self.config, self.device, self.score_dir = config, device, score_dir
        self.rows = read_eval_rows(eval_dir)
        size = config.evaluation.batch_size
        self.batches = [
            collate_batch(self.rows.slice(start, size).select(TOKEN_COLUMNS).to_pydict(), pad_token_id)
            for start in range(0, self.rows.num_rows, size)
        ]
        self.pad_token_id, self.verbalizer_ids = pad_token_id, verbalizer_ids
        self.tokenizer = load_pipeline_tokenizer(config) if config.task.kind == "generation" else None
        self.names = EVAL_METRICS[config.task.kind]

    def __call__(self, module: torch.nn.Module) -> dict[str, float]:

        student = _plain_student(self.config, module, self.score_dir)
        values = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        if student is not None:
            student.eval()
            if self.config.task.kind == "classification":
                scores = self._classify(student)
            else:
                scores, _ = generate_and_score(
                    student, self.rows, self.config, self.tokenizer, self.pad_token_id, self.device
                )
            student.train()
            values += torch.tensor([scores[name] for name in self.names], dtype=torch.float64, device=self.device)
        distributed.all_reduce_sum_(values)  # only rank 0 added its metrics
        return {f"eval.{name}": float(value) for name, value in zip(self.names, values)}

    @torch.no_grad()
    def _classify(self, student) -> dict[str, float]:

        verbalizers = torch.tensor(self.verbalizer_ids, device=self.device)
        predicted = []
        for batch in self.batches:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            logits, _ = forward_scored(student, batch, "classification", [])
            predicted += class_logits(logits, batch["attention_mask"], verbalizers).argmax(dim=-1).tolist()
        actual = self.rows.column("class_label").to_pylist()
        accuracy = sum(p == a for p, a in zip(predicted, actual)) / len(actual)
        return {"accuracy": accuracy, "macro_f1": macro_f1(predicted, actual)}


def _plain_student(config: PipelineConfig, module: torch.nn.Module, score_dir: Path | None):
    """The student as a plain model on rank 0 (None elsewhere). One rank: the trained module
    itself. Several: a copy with the gathered weights, since a sharded student can only run
    inside the root module's forward. Collective."""
    if distributed.world_size() == 1:
        return module.student
    state = distributed.full_model_state_dict(module)
    if not distributed.is_main_process():
        return None
    student = build_student(config, score_dir)
    student.load_state_dict(
        {key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")}
    )
    return student.to(distributed.device())
