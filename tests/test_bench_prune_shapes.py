"""``python benchmarks/prune_shapes.py`` without running it: every shape can be cut from the
teacher, and the page shows one row per shape with its numbers."""

from __future__ import annotations

from transformers import LlamaConfig

from benchmarks.generation import QUERY_HEADS_PER_KV_GROUP
from benchmarks.prune_shapes import SHAPES, prune_shapes_markdown
from flexkd.prune.student import PruneTargets

# SmolLM2-135M-Instruct's shape, as the GGUF's config gives it.
TEACHER = LlamaConfig(
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
)


def test_every_shape_is_one_the_teacher_can_be_cut_to():
    assert len({shape.name for shape in SHAPES}) == len(SHAPES)
    for shape in SHAPES:
        heads = QUERY_HEADS_PER_KV_GROUP * shape.num_key_value_heads
        targets = PruneTargets(
            shape.hidden_size, shape.num_layers, shape.intermediate_size, shape.num_key_value_heads, "importance", heads
        )
        targets.validate_for(TEACHER)


def test_the_page_shows_each_shape_with_its_numbers():
    row = {"parameters": 117_700_632, "rougeL": 8.846, "perplexity": 57.31, "distinct_2": 0.171}
    results = {
        "command": "python benchmarks/prune_shapes.py --work-dir /tmp/gr",
        "finished_at": "2026-12-07 04:00:00 UTC",
        "wall_seconds": 600.0,
        "machine": {"cpus": 2, "cpu_model": "AMD EPYC", "gpu": None, "git_commit": "abc1234"},
        "load": {"cpus": 2, "load1_mean": 2.1, "load1_min": 1.9, "load1_max": 2.5, "seconds": 600},
        "scoring_examples": 64,
        "eval_dialogues": 60,
        "max_new_tokens": 64,
        "rows": [
            row | {"shape": SHAPES[5].name, "repeated_ngram_outputs": 11.0, "first_output": "Amanda: You | me"},
            row | {"shape": SHAPES[6].name, "perplexity": 79.7, "repeated_ngram_outputs": 6.0, "first_output": "x"},
        ],
    }
    page = prune_shapes_markdown(results)
    assert page.startswith("## How hard to prune")
    assert "`python benchmarks/prune_shapes.py --work-dir /tmp/gr`" in page
    assert "(greedy, at most 64 new tokens" in page and "first 60 SAMSum dialogues" in page
    assert "| 504 wide, 30 blocks, MLP 1536 | 117.7M | 8.85 | 57.3 | 0.17 | 11 | Amanda: You \\| me |" in page
    assert "| 504 wide, 30 blocks, MLP 1536, units ranked at the last block | 117.7M | 8.85 | 79.7 |" in page
