"""Distributed setup for flexkd: process group, FSDP2 sharding, distributed checkpoints.

This is the only module that touches ``fully_shard``, device meshes, process groups and
``torch.distributed.checkpoint``. Stages call these functions from inside a Ray Train worker
(``TorchTrainer`` has already initialized the process group there) or from a ``torchrun``
process (call :func:`init_process_group_from_env` first). Every function also works in a
plain single process with no process group, where it degrades to the obvious no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

if TYPE_CHECKING:  # only for annotations; importing transformers costs seconds per process
    pass

log = logging.getLogger("flexkd")

META_FILENAME = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_HASH_BLOCK = 1 << 20


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose files do not match the sizes and SHA-256 digests in its ``meta.json``;
    the message is one line naming the checkpoint and the first bad file."""


# --------------------------------------------------------------------------- process group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group; 1 when there is none."""
    return dist.get_world_size() if _distributed() else 1


def rank() -> int:
    """Global rank of this process; 0 when there is no process group."""
    return dist.get_rank() if _distributed() else 0


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single process)."""
    return rank() == 0


def _uses_nccl() -> bool:
    # get_backend() may return a device-qualified list such as "cpu:gloo,cuda:nccl".
    return _distributed() and "nccl" in str(dist.get_backend())


def device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU.

    The GPU is the *current* CUDA device rather than a literal ``cuda:LOCAL_RANK``: under
    ``torchrun`` :func:`init_process_group_from_env` sets it to ``LOCAL_RANK``, and under Ray
    Train the worker context sets it to the GPU Ray assigned, which need not equal
    ``LOCAL_RANK`` when ``CUDA_VISIBLE_DEVICES`` is not shared across workers.
    """
    if torch.cuda.is_available() and _uses_nccl():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group_from_env(backend: str | None = None) -> None:
    """Initialize the default process group from torchrun's env vars (RANK, WORLD_SIZE, ...).

    ``backend``: "nccl" (one GPU per rank, the current device set to LOCAL_RANK) or "gloo"
    (CPU tensors, even on a machine with GPUs: the tests pass it so they run the same
    everywhere); None picks NCCL when CUDA is available, else gloo. A no-op when a group
    already exists, which is always the case inside a Ray Train worker (``TorchTrainer`` sets
    it up itself, with :func:`backend_for` of the stage's resources).
    """
    if _distributed():
        return
    backend = backend or backend_for(torch.cuda.is_available())
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def backend_for(use_gpu: bool) -> str:
    """The process-group backend of a job: NCCL when its ranks hold GPUs, else gloo."""
    return "nccl" if use_gpu else "gloo"


def task_device(use_gpu: bool) -> torch.device:
    """The device of a single-process task (an actor, a Ray task) that asked for ``use_gpu``:
    its GPU only then, so a CPU job on a machine with GPUs stays on the CPU it was given."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("resources.use_gpu is set, but this process sees no CUDA device")
    return torch.device("cuda")


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """bf16 autocast on ``device`` for ``precision`` 'bf16'; a disabled one for 'float32'."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        # torch.autocast would only warn and run float32 under a bf16 label.
        raise ValueError(f"training.precision: bf16 is not supported on {torch.cuda.get_device_name(device)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def use_threads(count: int | None) -> None:
    """Set this worker's torch thread count. Ray pins OMP_NUM_THREADS to the CPUs a worker
    reserves, which leaves cores idle when a small machine keeps a CPU free for Ray Data."""
    if count:
        torch.set_num_threads(count)


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if _distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it; identity without a process group.

    Under NCCL the tensor must live on :func:`device`.
    """
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# --------------------------------------------------------------------------- FSDP2


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks, found without naming the architecture.

    ``model`` may also wrap a Hugging Face model (the student together with its objective):
    the first submodule that is a Hugging Face model is searched.
    """
    model = next((module for module in model.modules() if callable(getattr(module, "get_decoder", None))), model)
    # Hugging Face decoders (Llama, Qwen, Mistral, SmolLM2, ...) keep their blocks in
    # ``get_decoder().layers``.
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    # Otherwise trust ``_no_split_modules``: HF lists there exactly the block classes that
    # must stay whole, which are the natural FSDP units.
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(type(child).__name__ in block_names for child in module)
        ):
            return module
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: no get_decoder().layers "
        f"and no nn.ModuleList of its _no_split_modules {sorted(block_names)}"
    )


# training.precision 'bf16' for a sharded student: bf16 all-gathers and compute, float32 gradient
# reduction (a bf16 sum over many ranks loses the small gradients), float32 sharded parameters and
# optimizer state.
BF16_MIXED_PRECISION = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute each decoder block's activations in the backward instead of keeping them; in place.

    One non-reentrant ``torch.utils.checkpoint`` region per block (the unit :func:`shard_model`
    shards), so peak activation memory is one block's plus the block inputs. Call it before
    :func:`shard_model`, as FSDP2 expects. Parameter names in state dicts and checkpoints do not
    change (the wrapper's prefix is stripped), so checkpointed and plain runs share checkpoints.
    Under ``torch.no_grad`` nothing is kept anyway and the blocks run once.
    """
    blocks = set(_decoder_blocks(model))
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda block: checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: module in blocks,
    )
    return model


def shard_model(
    model: nn.Module,
    *,
    trainable: bool,
    mixed_precision: MixedPrecisionPolicy | None = None,
    full_precision: Sequence[nn.Module] = (),
) -> nn.Module:
    """Shard ``model`` with FSDP2: one ``fully_shard`` unit per decoder block, then the root.

    ``trainable=False`` (the frozen teacher) turns off ``requires_grad`` on every parameter
    first, so FSDP never allocates or reduce-scatters gradients for it, and every unit frees its
    gathered weights after its forward (``reshard_after_forward=True``, the root included): a
    frozen model never needs them again before its next forward, except in the score stage's
    backward, which gathers them again. A trainable model keeps FSDP2's default (the root stays
    gathered for the backward that follows at once).

    ``mixed_precision`` (e.g. :data:`BF16_MIXED_PRECISION`) applies to the blocks and the root;
    the root does not cast its forward inputs, which for the student carry the teacher's float32
    targets. ``full_precision`` modules (the student's trained feature modules: a projector)
    become units of their own that compute in float32, since their losses need it.

    ``model`` may hold meta parameters (see :func:`materialize`): only each rank's shards are
    then ever allocated. With one rank (or no process group) the model is returned unchanged:
    sharding would only add overhead. Tied weights (``lm_head`` sharing ``embed_tokens``, as in
    SmolLM2) stay tied because both modules fall into the root unit, which owns the single shared
    parameter.
    """
    if not trainable:
        model.requires_grad_(False)
    if world_size() == 1:
        return model

    mesh = init_device_mesh(device().type, (world_size(),))
    reshard = None if trainable else True  # None: FSDP2's default
    policy = mixed_precision or MixedPrecisionPolicy()
    units: list[nn.Module] = [*full_precision, *_decoder_blocks(model), model]
    for unit in full_precision:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    for block in _decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=replace(policy, cast_forward_inputs=False), reshard_after_forward=reshard)
    if not _uses_nccl():
        # pytorch/pytorch#162338: FSDP2 asks gloo for a ReduceOp.AVG reduce-scatter of the
        # gradients, and on the torch 2.8-era builds it was reported against (Sept 2025)
        # gloo silently summed instead, so N CPU ranks got gradients N times too large.
        # torch 2.13 averages correctly (tests/test_distributed.py passes without this
        # guard), but SUM plus FSDP's own division by the world size is right on every
        # version and costs one division per shard, so keep it. NCCL keeps its fused AVG.
        for unit in units:
            assert isinstance(unit, FSDPModule)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Give a model built with meta parameters (and real buffers) uninitialized storage on
    ``device``; after :func:`shard_model` that is only this rank's shards. Buffers (rotary
    frequencies) keep their values and tied weights stay tied (``to_empty`` unties them in an
    unsharded model). Fill the weights with :func:`load_safetensors_shards` or
    :func:`broadcast_from_rank0`."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    tied = [names for names in _parameter_names(model).values() if len(names) > 1]
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    for first, *others in tied:
        for name in others:
            module, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module), attribute, model.get_parameter(first))
    return model


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (a tied one has several), by the parameter's identity."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def load_safetensors_shards(model: nn.Module, folder: Path) -> None:
    """Fill a model (sharded or whole) from a Hugging Face safetensors folder, in place.

    Each rank reads only the slices of its own shards (``torch.distributed.checkpoint`` with
    its ``HuggingFaceStorageReader``), converted to the model's dtype: no rank ever holds the
    whole model, in memory or read from disk. Collective under a process group. A parameter the
    files lack must be tied to one they hold (``lm_head`` to ``embed_tokens``); otherwise raises
    ValueError naming it.
    """
    state = get_model_state_dict(model)
    reader = HuggingFaceStorageReader(str(folder))
    stored = set(reader.read_metadata().state_dict_metadata)
    names_of = [{name.replace(_CHECKPOINT_PREFIX, "") for name in names} for names in _parameter_names(model).values()]
    untied_missing = sorted(name for names in names_of if not names & stored for name in names if name in state)
    if untied_missing:
        raise ValueError(f"{folder}: the safetensors files have no tensor {untied_missing[0]!r} of the model")
    with _single_process_ok():
        dcp.load({name: value for name, value in state.items() if name in stored}, storage_reader=reader)


def broadcast_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Fill a sharded model from the full state dict that rank 0 holds (other ranks pass
    ``{}``): rank 0 sends it tensor by tensor and each rank keeps its shard. Collective. For
    models that exist only whole (a GGUF file, a seeded random teacher): rank 0 holds the whole
    model once, in CPU memory, and no rank holds it on a device."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)


# --------------------------------------------------------------------------- checkpoints


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silence DCP's per-call warning that it runs without a process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write model and optimizer state to ``directory/step_{step:08d}/`` with DCP.

    Collective: every rank must call it. Each rank writes its own shards (a shared
    filesystem is required across nodes); rank 0 then records every file's size and SHA-256
    in ``meta.json`` (with step, extra, world_size) and writes it last, so its presence marks
    a complete checkpoint and its digests let a reader detect a truncated or corrupted one.
    A directory left by an earlier attempt at the same step is removed first: new shards
    written under an old ``meta.json`` would look complete while half written.
    """
    path = Path(directory) / f"step_{step:08d}"
    if is_main_process() and path.exists():
        shutil.rmtree(path)
    barrier()  # no rank may write into the directory before the stale one is gone
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    # Every rank's shards must be on disk before the marker says the checkpoint is whole.
    barrier()
    if is_main_process():
        meta = {"step": step, "extra": extra or {}, "world_size": world_size(), "files": _file_digests(path)}
        tmp = path / f"{META_FILENAME}.tmp"
        with tmp.open("w") as handle:
            handle.write(json.dumps(meta, indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path / META_FILENAME)  # atomic: a reader never sees half a marker
    # No rank may look for the newest checkpoint before the marker exists.
    barrier()
    return path


def load_checkpoint(checkpoint_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` directory into ``model`` and ``optimizer`` in place.

    Collective. The files are checked against the sizes and digests in ``meta.json`` first;
    a mismatch raises :class:`CorruptCheckpointError` naming the file, before anything is
    loaded. The checkpoint may have been written by a different number of ranks: DCP
    reshards on load. Returns the checkpoint's ``meta.json`` without the file list.
    """
    checkpoint_dir = Path(checkpoint_dir)
    meta = verify_checkpoint(checkpoint_dir)
    # get_state_dict gives the target layout (and fills AdamW's lazily created state), which
    # dcp.load then fills in place from the files.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=checkpoint_dir)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return {key: value for key, value in meta.items() if key != "files"}


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest intact ``step_*`` checkpoint under ``directory``, else None.

    A step directory without ``meta.json`` is an interrupted save and is ignored. A complete
    one whose files fail :func:`verify_checkpoint` is skipped with a warning naming it, and
    the next older one is tried. When complete checkpoints exist but none is intact, raises
    :class:`CorruptCheckpointError` naming each one: starting over silently would discard
    hours of training, and the user should decide.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete = sorted(
        (
            (int(match.group(1)), child)
            for child in directory.iterdir()
            if (match := _STEP_DIR.match(child.name)) and (child / META_FILENAME).is_file()
        ),
        reverse=True,
    )
    problems = []
    for _, candidate in complete:
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as error:
            log.warning("skipping corrupt checkpoint: %s", error)
            problems.append(str(error))
            continue
        return candidate
    if problems:
        raise CorruptCheckpointError(
            f"no intact checkpoint in {directory}: {'; '.join(problems)}; "
            "delete the checkpoints directory to start this stage over"
        )
    return None


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` intact checkpoints under ``directory``; delete the older ones and
    every corrupt one. Returns what was deleted. Call it on one rank, after a save.

    Intact here means complete with the recorded file sizes (no digests: a prune after every
    save must not read the whole checkpoint again). Pruning by name alone could keep a corrupt
    newest checkpoint and delete the last good one.
    """
    directory = Path(directory)
    complete = sorted(
        (
            child
            for child in directory.glob("step_*")
            if _STEP_DIR.match(child.name) and (child / META_FILENAME).is_file()
        ),
        reverse=True,
    )
    kept, deleted = 0, []
    for candidate in complete:
        try:
            verify_checkpoint(candidate, check_digests=False)
            intact = True
        except CorruptCheckpointError as error:
            log.warning("deleting corrupt checkpoint: %s", error)
            intact = False
        if intact and kept < keep:
            kept += 1
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        deleted.append(candidate)
    return deleted


def verify_checkpoint(checkpoint_dir: Path, check_digests: bool = True) -> dict[str, Any]:
    """Check every file of a checkpoint against ``meta.json``; returns the meta.

    Raises :class:`CorruptCheckpointError` (one line, naming the checkpoint and the file) for
    an unreadable ``meta.json`` or a missing, truncated or altered file; files the meta does
    not list (an NFS temp file, say) are not part of the checkpoint and are ignored. A
    checkpoint written before digests were recorded (no ``files`` in its meta) passes with a
    warning. A digest verified once in this process is not recomputed while the file's size
    and modification time stay the same (latest_checkpoint and load_checkpoint both verify).
    ``check_digests=False`` checks presence and sizes only.
    """
    checkpoint_dir = Path(checkpoint_dir)
    meta_path = checkpoint_dir / META_FILENAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a complete checkpoint: no {META_FILENAME}")
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta.get("files")
        if expected is not None:
            expected = {str(name): (int(record["size"]), str(record["sha256"])) for name, record in expected.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpointError(f"checkpoint {checkpoint_dir}: {META_FILENAME} is not valid") from None
    if expected is None:
        log.warning("checkpoint %s has no file digests (written by an older flexkd); not verified", checkpoint_dir)
        return meta
    for name, (size, sha256) in sorted(expected.items()):
        file = checkpoint_dir / name
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {checkpoint_dir}: {name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise CorruptCheckpointError(
                f"checkpoint {checkpoint_dir}: {name} has {actual} bytes, expected {size} (truncated?)"
            )
        if check_digests and _sha256(file, cache=True) != sha256:
            raise CorruptCheckpointError(f"checkpoint {checkpoint_dir}: {name} does not match its SHA-256")
    return meta


def _checkpoint_files(path: Path) -> set[str]:
    """Every file of a checkpoint but its marker, as paths relative to the checkpoint."""
    return {
        file.relative_to(path).as_posix()
        for file in path.rglob("*")
        if file.is_file() and file.name not in (META_FILENAME, f"{META_FILENAME}.tmp")
    }


def _file_digests(path: Path) -> dict[str, dict[str, Any]]:
    return {
        name: {"size": (path / name).stat().st_size, "sha256": _sha256(path / name, cache=False)}
        for name in sorted(_checkpoint_files(path))
    }


# (path, size, mtime_ns) -> SHA-256, for files read by verify_checkpoint in this process. Digests
# computed while saving are not cached: the files could still be damaged after that.
_VERIFIED_DIGESTS: dict[tuple[str, int, int], str] = {}


def _sha256(file: Path, cache: bool) -> str:
    status = file.stat()
    key = (str(file.resolve()), status.st_size, status.st_mtime_ns)
    if cache and key in _VERIFIED_DIGESTS:
        return _VERIFIED_DIGESTS[key]
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    if cache:
        _VERIFIED_DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on CPU on rank 0 (for ``save_pretrained(state_dict=)``).

    Collective: every rank must call it (it all-gathers the shards). Other ranks get ``{}``.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if is_main_process() else {}
