"""The figures of docs/SCALING.md, from flexkd's capacity planner (flexkd/models/capacity.py).

    python scripts/scaling_table.py        # prints the markdown that docs/SCALING.md holds

A Llama-3.1-70B-shaped teacher and a Llama-3.1-8B-shaped student, both built on the meta device,
generation at 2048 tokens, 4 rows per rank and step, bf16 teacher, bf16 mixed-precision student,
activation checkpointing, on 8, 32 and 128 H100s of 80 GB (989 TFLOP/s dense bf16, 40% MFU).
tests/test_capacity.py checks that docs/SCALING.md shows exactly this output.
"""

from __future__ import annotations

from transformers import LlamaConfig

from flexkd.models.capacity import (
    GB,
    Hardware,
    ModelShape,
    cache_bytes_per_token,
    plan_distill,
    plan_evaluate,
    plan_score,
    plan_targets,
)

TEACHER_70B = LlamaConfig(
    hidden_size=8192,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=28672,
    vocab_size=128256,
)
STUDENT_8B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
)
GPU_COUNTS = (8, 32, 128)
ROWS, SEQUENCE, NEW_TOKENS = 4, 2048, 128
TOKENS = 1e9
# Inter-node bandwidth per GPU for the FSDP traffic: one 400 Gb/s InfiniBand NIC per GPU.
NETWORK_BYTES_PER_S = 50e9


def _gb(value: float) -> str:
    return f"{value / GB:.0f}" if value >= 10 * GB else f"{value / GB:.1f}"


def _hours(flops_per_token: float, gpus: int, hardware: Hardware) -> str:
    return f"{flops_per_token * TOKENS / (gpus * hardware.peak_flops * hardware.mfu) / 3600:.1f}"


def main() -> None:
    teacher, student = ModelShape.of(TEACHER_70B), ModelShape.of(STUDENT_8B)
    lines = [
        f"Teacher {teacher.parameters / 1e9:.1f}B parameters (bf16: {teacher.parameters * 2 / GB:.0f} GB), "
        f"student {student.parameters / 1e9:.2f}B; {ROWS} rows x {SEQUENCE} tokens per rank and step.",
        "",
        "Peak memory per GPU in GB (usable: 72 of 80), and whether it fits:",
        "",
        "| stage | GPUs | weights | grads + optimizer | gathered | activations | logits | total | fits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for gpus in GPU_COUNTS:
        hardware = Hardware(gpus, 80 * GB)
        stages = [
            plan_score(teacher, hardware, ROWS, SEQUENCE, 2, "generation", checkpointing=True),
            plan_targets(teacher, hardware, ROWS, SEQUENCE, 2, "generation"),
            plan_distill(student, teacher, hardware, ROWS, SEQUENCE, 2, 2, "generation", checkpointing=True),
            plan_distill(student, None, hardware, ROWS, SEQUENCE, 2, 2, "generation", checkpointing=True),
            plan_evaluate(teacher, student, hardware, ROWS, SEQUENCE, NEW_TOKENS, 2, "generation"),
        ]
        names = [
            "score",
            "targets (1 actor/GPU)",
            "distill, online teacher",
            "distill, cached teacher",
            "evaluate (1 GPU)",
        ]
        for name, stage in zip(names, stages, strict=True):
            memory = stage.memory
            parts = [memory[part] for part in ("weights", "grads+optimizer", "gathered", "activations", "logits")]
            lines.append(
                f"| {name} | {gpus} | "
                + " | ".join("-" if value == 0 else _gb(value) for value in parts)
                + f" | {_gb(stage.total)} | {'yes' if stage.fits(hardware) else '**no**'} |"
            )
    lines += [
        "",
        f"Hours per {TOKENS / 1e9:.0f}B tokens through a stage, all GPUs busy at 40% MFU of 989 TFLOP/s, and the",
        "FSDP traffic of one distill step (online teacher) per GPU against its compute:",
        "",
        "| GPUs | score | targets | distill, online | distill, cached | FSDP GB/step/GPU | network s vs compute s |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for gpus in GPU_COUNTS:
        hardware = Hardware(gpus, 80 * GB)
        tokens_per_rank = ROWS * SEQUENCE
        # Teacher: gathered once per forward (bf16). Student: gathered for forward, again for the
        # backward and the checkpointed recompute (bf16), gradients reduce-scattered in float32.
        traffic = (teacher.parameters * 2 + student.parameters * (3 * 2 + 4)) * (gpus - 1) / gpus
        compute = (2 * teacher.parameters + 8 * student.parameters) * tokens_per_rank
        compute_s = compute / (hardware.peak_flops * hardware.mfu)
        lines.append(
            f"| {gpus} | {_hours(6 * teacher.parameters, gpus, hardware)} | {_hours(2 * teacher.parameters, gpus, hardware)}"
            f" | {_hours(2 * teacher.parameters + 8 * student.parameters, gpus, hardware)}"
            f" | {_hours(8 * student.parameters, gpus, hardware)} | {traffic / GB:.0f}"
            f" | {traffic / NETWORK_BYTES_PER_S:.1f} vs {compute_s:.1f} |"
        )
    uniform = cache_bytes_per_token(student.layers, student.hidden, "generation", 32, 2)
    last = cache_bytes_per_token(1, student.hidden, "generation", 32, 2)
    lines += [
        "",
        f"Teacher-target cache for {TOKENS / 1e9:.0f}B tokens (k = {student.hidden} units per mapped layer, float16, "
        "top-32 logits): "
        f"layer_map uniform ({student.layers} layers) {uniform * TOKENS / 1e12:.0f} TB, "
        f"layer_map last (1 layer) {last * TOKENS / 1e12:.1f} TB.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
