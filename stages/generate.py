"""generate: the teacher's responses to the training prompts, for sequence-level KD (Kim & Rush, 2016).

Runs only when the pipeline file has a ``generate`` section (generation tasks). Ray Data reads the
train split's good rows, numbered (``flexkd.data.numbered``; with ``replace_references`` the rows
need no response column), and a pool of actors, each holding the whole frozen teacher, answers
them ``generate.batch_size`` prompts at a time: each prompt rendered and tokenized as tokenize
does it, left-padded, then ``generate``, greedy or sampled. The driver writes, in source order:

    responses.parquet   the prompt template's columns; the response column, holding the teacher's
                        response (with replace_references false: each row twice, the data's
                        reference, then the teacher's response); response_source ("data" or
                        "teacher"); source_example_id, the row's example_id in data.train

tokenize reads this file as the train split (``flexkd.data.splits.pipeline_splits``), so score
(unless data.score is given), targets and distill train on the teacher's responses, while eval
keeps the data's references. A train row's example_id is then its position in this file.

A prompt keeps its last ``data.max_length - min(max_new_tokens + 1, data.max_length // 2)``
tokens: what tokenize keeps of it beside a response of max_new_tokens tokens and eos, so the
teacher answers the prompt the student trains on. A response that decodes to blank text (the
teacher stopped at once) is left out and counted; so is one that is a single n-gram repeated
(``flexkd.evaluation.metrics.is_one_repeated_ngram``; kept with ``generate.drop_looping: false``),
since a greedy teacher loops on some prompts and a student trained on the loop learns it. One
cut at max_new_tokens is kept unless ``generate.drop_truncated``: tokenize ends every response
with eos, so a cut one teaches the student to stop mid-sentence, and only responses that ended
by themselves teach it where to stop. The stage stops, in one line, when too few rows are left
to fill a batch on every worker. With ``do_sample``, each batch's sampling is seeded with
``generate.seed`` plus its first row's example_id, so a rerun writes the same responses wherever
the batches run.

MLflow (the stage's run): the generate settings as params; the metrics rows, blank_responses,
looping_responses (left out or, with drop_looping false, kept), truncated_responses (those that
reached max_new_tokens, left out or kept), mean_response_tokens, and distinct_2 of the first
1000 responses written; the first 20 responses written as the table ``responses.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from transformers import GenerationConfig

from flexkd import distributed
from flexkd.cluster.local import ACTOR_POOL_OPTIONS
from flexkd.config.schema import ConfigError, GenerateConfig, PipelineConfig, TaskConfig
from flexkd.data.numbered import numbered_dataset
from flexkd.data.rows import prompt_token_ids, template_columns
from flexkd.data.shards import ordered_execution
from flexkd.data.sources import RowRules, blank_text
from flexkd.data.splits import GENERATED_TRAIN_FILE, check_split, split_task, train_rows_per_worker
from flexkd.errors import StageError
from flexkd.evaluation.metrics import distinct_n, is_one_repeated_ngram
from flexkd.method.decoding import left_padded
from flexkd.models.plan import load_pipeline_tokenizer, load_teacher
from flexkd.progress import actor_progress

SAMPLE_ROWS = 20  # responses logged as the MLflow table
DISTINCT_ROWS = 1000  # the responses whose distinct-2 is logged (the driver keeps their text)
# Per-row facts the actors return beside the rows, dropped before the file is written.
_TOKENS, _TRUNCATED, _LOOPING, _BLANK = "_response_tokens", "_truncated", "_looping", "_blank"


def run(config: PipelineConfig, inputs: dict[str, Path], output_dir: Path) -> dict[str, Any]:
    settings, source = config.generate, config.data.train
    if settings is None:
        raise StageError("generate: the pipeline file has no generate section")
    task = split_task(config.task, source)
    tokenizer = load_pipeline_tokenizer(config)
    if tokenizer.eos_token_id is None:
        raise StageError("generate: the teacher's tokenizer has no eos token to end a response with")
    labeled = not settings.replace_references
    prompt_budget = config.data.max_length - min(settings.max_new_tokens + 1, config.data.max_length // 2)
    try:
        summary = check_split("train", source, config.task, config.data.on_bad_rows, labeled=labeled)
        rules = RowRules.for_task(task, labeled=labeled)
        # ordered: responses in the order of the source's rows
        with ordered_execution(), actor_progress("generate", summary.good, unit="prompts") as counter:
            answered = numbered_dataset(source, rules).map_batches(
                TeacherResponses,
                fn_constructor_kwargs={
                    "config": config,
                    "task": task,
                    "tokenizer": tokenizer,
                    "prompt_budget": prompt_budget,
                    "counter": counter,
                },
                batch_format="pyarrow",
                batch_size=settings.batch_size,
                compute=ray.data.ActorPoolStrategy(size=config.resources.num_workers),
                num_cpus=config.resources.cpus_per_worker,
                num_gpus=1 if config.resources.use_gpu else 0,
                **ACTOR_POOL_OPTIONS,
            )
            written = _write_responses(
                answered, task, output_dir / GENERATED_TRAIN_FILE, settings.drop_looping, settings.drop_truncated
            )
    except ConfigError as error:  # DataError included: "data.train (<path>): <cause>"
        raise StageError(f"generate: {error}") from None
    counts = _response_counts(written, settings.drop_looping)
    refusal = _too_few_responses(
        counts, settings, summary.good, config.resources.num_workers, train_rows_per_worker(config)
    )
    if refusal:
        raise StageError(refusal)
    answers = written["teacher_rows"]
    scores = {
        "mean_response_tokens": written["response_tokens"] / max(answers, 1),
        "distinct_2": distinct_n(written["first_responses"], 2),
    }
    mlflow.log_params({f"generate.{name}": value for name, value in settings.model_dump().items()})
    mlflow.log_metrics({name: float(value) for name, value in (counts | scores).items()})
    if written["sample"]:  # empty when no response is written beside kept references
        mlflow.log_table(written["sample"], artifact_file="responses.json")
    return {"file": GENERATED_TRAIN_FILE, "prompts": summary.good, "bad_rows_skipped": summary.bad} | counts | scores


def _response_counts(written: dict[str, Any], drop_looping: bool) -> dict[str, int]:
    """The counts of the manifest: rows written (kept references included); the teacher's blank
    responses (never written), its looping ones (written only without ``drop_looping``) and those
    cut at max_new_tokens (written only without ``drop_truncated``)."""
    return {
        "rows": written["rows"],
        "blank_responses": written["blank"],
        "looping_responses": written["looping"],
        "truncated_responses": written["truncated"],
    }


def _too_few_responses(
    counts: dict[str, int], settings: GenerateConfig, prompts: int, workers: int, share: int
) -> str | None:
    """The stage's one-line refusal when the rows written cannot give each of ``workers`` the
    ``share`` of a batch it trains on (none at all included), naming what was left out; else None.
    Only the stage can tell: how many responses are blank, loops or cut is known once written."""
    left_out = {
        "blank": counts["blank_responses"],
        "one n-gram repeated": settings.drop_looping and counts["looping_responses"],
        "cut at generate.max_new_tokens": settings.drop_truncated and counts["truncated_responses"],
    }
    kinds = " or ".join(kind for kind, count in left_out.items() if count)
    if counts["rows"] == 0:
        return f"generate: the teacher's responses to all {prompts} prompts of data.train are {kinds}; nothing is left to train on"
    if counts["rows"] < workers * share:
        return (
            f"generate: {counts['rows']} rows are left of the teacher's responses to {prompts} prompts of data.train"
            + (f" (those {kinds} left out)" if kinds else "")
            + f", too few to give each of {workers} workers (resources.num_workers) the {share} it trains on per "
            "batch; use more prompts or fewer workers"
        )
    return None


class TeacherResponses:
    """A Ray Data actor: loads the teacher once, then answers batches of numbered raw rows, and
    counts them on ``counter`` (a flexkd.progress.RowCounter), if given."""

    def __init__(
        self,
        config: PipelineConfig,
        task: TaskConfig,
        tokenizer,
        prompt_budget: int,
        counter: ray.actor.ActorHandle | None = None,
    ):
        distributed.use_threads(config.resources.threads_per_worker)
        self.device = distributed.task_device(config.resources.use_gpu)
        self.teacher = load_teacher(config).to(self.device)
        self.task, self.tokenizer, self.prompt_budget, self.counter = task, tokenizer, prompt_budget, counter
        self.settings = config.generate
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = {"temperature": self.settings.temperature, "top_p": self.settings.top_p}
        # A generation config of our own: the teacher's (e.g. a chat model's sampling defaults) is not read.
        self.generation = GenerationConfig(
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=self.settings.do_sample,
            pad_token_id=self.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(sampling if self.settings.do_sample else {}),
        )

    @torch.no_grad()
    def __call__(self, rows: pa.Table) -> pa.Table:
        _, prompt_ids = prompt_token_ids(rows.to_pydict(), self.tokenizer, self.task)
        prompts = [ids[-self.prompt_budget :] for ids in prompt_ids]
        input_ids, attention_mask = left_padded(prompts, self.pad_token_id, self.device)
        if self.settings.do_sample:
            torch.manual_seed(self.settings.seed + int(rows.column("example_id")[0].as_py()))
        generated = self.teacher.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation
        )[:, input_ids.shape[1] :].tolist()
        responses, lengths, truncated = [], [], []
        for ids in generated:
            ended = self.tokenizer.eos_token_id in ids
            ids = ids[: ids.index(self.tokenizer.eos_token_id)] if ended else ids
            responses.append(self.tokenizer.decode(ids, skip_special_tokens=True))
            lengths.append(len(ids))
            truncated.append(not ended)
        if self.counter is not None:
            self.counter.add.remote(rows.num_rows)
        return _response_rows(rows, self.task, responses, lengths, truncated, not self.settings.replace_references)


def _response_rows(
    rows: pa.Table, task: TaskConfig, responses: list[str], lengths: list[int], truncated: list[bool], keep_data: bool
) -> pa.Table:
    """The rows to write for one batch: prompt columns, the response column, its source, the row's
    id; the teacher's blank responses (``_BLANK``), looping ones (``_LOOPING``) and those cut at
    max_new_tokens (``_TRUNCATED``) marked, for the driver to count and leave out (blank ones
    always, the others as drop_looping and drop_truncated say); with ``keep_data``
    (replace_references false) each row's reference first, then the teacher's response."""
    prompts = rows.select(template_columns(task.prompt_template))
    count = rows.num_rows

    def rows_with(
        response: pa.Array, origin: str, tokens: list[int], cut: list[bool], looping: list[bool], blank: list[bool]
    ) -> pa.Table:
        return (
            prompts.append_column(task.response_column, response)
            .append_column("response_source", pa.array([origin] * count))
            .append_column("source_example_id", rows.column("example_id"))
            .append_column(_TOKENS, pa.array(tokens, pa.int64()))
            .append_column(_TRUNCATED, pa.array(cut))
            .append_column(_LOOPING, pa.array(looping, pa.bool_()))
            .append_column(_BLANK, pa.array(blank, pa.bool_()))
        )

    looping = [is_one_repeated_ngram(text, cut) for text, cut in zip(responses, truncated, strict=True)]
    # Blank as check_rows has it: a response tokenize would refuse as "empty text".
    answers = pa.array(responses, pa.string())
    teacher = rows_with(answers, "teacher", lengths, truncated, looping, blank_text(answers).to_pylist())
    if keep_data:
        no = [False] * count  # a reference is neither cut, nor a loop, nor blank (check_split saw to that)
        data = rows_with(rows.column(task.response_column).cast(pa.string()), "data", [0] * count, no, no, no)
        # Interleaved: row i's reference at 2i, its teacher response at 2i + 1.
        teacher = pa.concat_tables([data, teacher]).take(np.arange(2 * count).reshape(2, count).T.ravel())
    return teacher


def _write_responses(
    answered: ray.data.Dataset, task: TaskConfig, path: Path, drop_looping: bool, drop_truncated: bool
) -> dict[str, Any]:
    """Stream the answered rows into one parquet file, in order, the blank responses left out, the
    looping ones too with ``drop_looping`` and those cut at max_new_tokens with ``drop_truncated``;
    returns the counts (of looping responses: all of them; of truncated ones: all that are neither
    blank nor left out as loops), and of the teacher responses written the first DISTINCT_ROWS and
    the first SAMPLE_ROWS as a table (column -> values)."""
    writer: pq.ParquetWriter | None = None
    written: dict[str, Any] = dict.fromkeys(
        ("rows", "teacher_rows", "blank", "looping", "truncated", "response_tokens"), 0
    )
    responses: list[str] = []
    shown = [*template_columns(task.prompt_template), task.response_column, "source_example_id"]
    sample: list[pa.Table] = []
    try:
        for batch in answered.iter_batches(batch_format="pyarrow", batch_size=None):
            written["blank"] += pc.sum(batch.column(_BLANK).cast(pa.int64())).as_py() or 0
            written["looping"] += pc.sum(batch.column(_LOOPING).cast(pa.int64())).as_py() or 0
            left_out = pc.or_(batch.column(_BLANK), batch.column(_LOOPING)) if drop_looping else batch.column(_BLANK)
            batch = batch.filter(pc.invert(left_out))
            # References are never marked cut: this counts the teacher's responses only.
            written["truncated"] += pc.sum(batch.column(_TRUNCATED).cast(pa.int64())).as_py() or 0
            if drop_truncated:
                batch = batch.filter(pc.invert(batch.column(_TRUNCATED)))
            answers = batch.filter(pc.equal(batch.column("response_source"), "teacher"))
            written["teacher_rows"] += answers.num_rows
            written["response_tokens"] += pc.sum(answers.column(_TOKENS)).as_py() or 0
            responses += answers.column(task.response_column).to_pylist()[: DISTINCT_ROWS - len(responses)]
            sample.append(answers.select(shown).slice(0, SAMPLE_ROWS - sum(table.num_rows for table in sample)))
            rows = batch.drop_columns([_TOKENS, _TRUNCATED, _LOOPING, _BLANK])
            if rows.num_rows == 0:
                continue
            if writer is None:
                writer = pq.ParquetWriter(str(path), rows.schema)
            writer.write_table(rows.cast(writer.schema))
            written["rows"] += rows.num_rows
    finally:
        if writer is not None:
            writer.close()
    shown_rows = pa.concat_tables(sample) if sample else None
    return written | {
        "first_responses": responses,
        "sample": shown_rows.to_pydict() if shown_rows and shown_rows.num_rows else {},
    }
