"""flexkd.distributed on real processes: one process, two gloo ranks, and a real Ray Train run.

The two-rank checks (gradients and checkpoints) share one ``torch.multiprocessing.spawn``
because starting two Python processes that import torch and transformers dominates the
runtime on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_on_two_ranks
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from flexkd import distributed as fd

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama whose lm_head is tied to embed_tokens, as in SmolLM2."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _batch() -> torch.Tensor:
    """A fixed batch of 4 token sequences, length 16, no padding."""
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1234))


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """Run ``steps`` AdamW steps on this rank's share of the batch; returns the losses."""
    input_ids = _batch().chunk(fd.world_size())[fd.rank()]
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- single process


def test_single_process_shard_is_noop_and_checkpoint_round_trips(tmp_path: Path) -> None:
    assert not dist.is_initialized()
    assert (fd.world_size(), fd.rank(), fd.is_main_process()) == (1, 0, True)
    assert fd.device() == torch.device("cpu")
    ones = torch.ones(3)
    assert fd.all_reduce_sum_(ones) is ones and ones.tolist() == [1.0, 1.0, 1.0]

    teacher = _tiny_llama()
    assert fd.shard_model(teacher, trainable=False) is teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, fd.FSDPModule) for m in teacher.modules())

    model = fd.shard_model(_tiny_llama(), trainable=True)
    assert all(p.requires_grad for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, optimizer, steps=2)
    path = fd.save_checkpoint(tmp_path, model, optimizer, step=2, extra={"epoch": 0})
    assert path == tmp_path / "step_00000002"
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optim = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}

    # A step directory without meta.json is an interrupted save and must be ignored.
    (tmp_path / "step_00000009").mkdir()
    assert fd.latest_checkpoint(tmp_path) == path
    assert fd.latest_checkpoint(tmp_path / "missing") is None

    fresh = _tiny_llama(seed=1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    meta = fd.load_checkpoint(path, fresh, fresh_optimizer)
    assert meta == {"step": 2, "extra": {"epoch": 0}, "world_size": 1}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved_params[key]), key
    for name, p in fresh.named_parameters():
        state = fresh_optimizer.state[p]
        assert state.keys() == saved_optim[name].keys()
        for key, value in state.items():
            assert torch.equal(value, saved_optim[name][key]), (name, key)
    # The tie survives the load: one tensor, not two equal copies.
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight

    full = fd.full_model_state_dict(fresh)
    assert full.keys() == fresh.state_dict().keys()
    assert all(v.device.type == "cpu" for v in full.values())


def test_an_explicit_gloo_backend_keeps_cpu_tensors_where_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-rank tests pass gloo; on a GPU machine that must not pick NCCL or touch a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device under gloo"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    fd.init_process_group_from_env(backend="gloo")
    try:
        assert dist.get_backend() == "gloo" and fd.device() == torch.device("cpu")
    finally:
        dist.destroy_process_group()
    assert (fd.backend_for(True), fd.backend_for(False)) == ("nccl", "gloo")


def test_a_task_uses_its_gpu_only_when_its_resources_ask_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fd.task_device(use_gpu=False) == torch.device("cpu")
    assert fd.task_device(use_gpu=True) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="resources.use_gpu is set, but this process sees no CUDA device"):
        fd.task_device(use_gpu=True)


def test_decoder_blocks_fall_back_to_no_split_modules() -> None:
    class Block(torch.nn.Linear):
        pass

    class Custom(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.blocks = torch.nn.ModuleList([Block(2, 2), Block(2, 2)])

    custom = Custom()
    assert fd._decoder_blocks(custom) is custom.blocks
    llama = _tiny_llama()
    assert fd._decoder_blocks(llama) is llama.model.layers
    custom._no_split_modules = ["Other"]
    with pytest.raises(ValueError, match="decoder blocks"):
        fd._decoder_blocks(custom)


# --------------------------------------------------------------------------- two gloo ranks


def _two_rank_worker(out_dir: str) -> None:
    """One of two gloo ranks: sharded gradients, then a DCP save/load round trip."""
    fd.init_process_group_from_env(backend="gloo")  # the group exists already, so this is a no-op
    assert dist.get_backend() == "gloo" and fd.device() == torch.device("cpu")
    out = Path(out_dir)
    # Gradients: each rank takes half of the batch; FSDP must average them.
    model = fd.shard_model(_tiny_llama(), trainable=True)
    assert isinstance(model, fd.FSDPModule)
    assert isinstance(model.model.layers[0], fd.FSDPModule)
    input_ids = _batch().chunk(2)[fd.rank()]
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert isinstance(p.grad, DTensor), name
        grads[name] = p.grad.full_tensor()  # collective: every rank calls it
    if fd.is_main_process():
        torch.save(grads, out / "grads.pt")

    # Checkpoint: train, save at step 3, load into a fresh sharded model.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.zero_grad()
    _train_steps(model, optimizer, steps=1)
    path = fd.save_checkpoint(out / "ckpt", model, optimizer, step=3, extra={"tag": "x"})
    saved = fd.full_model_state_dict(model)
    fresh = fd.shard_model(_tiny_llama(seed=1), trainable=True)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    meta = fd.load_checkpoint(fd.latest_checkpoint(out / "ckpt"), fresh, fresh_optimizer)
    loaded = fd.full_model_state_dict(fresh)
    total = fd.all_reduce_sum_(torch.tensor([float(fd.rank() + 1)]))
    if fd.is_main_process():
        torch.save(
            {"path": str(path), "meta": meta, "saved": saved, "loaded": loaded, "total": total.item()}, out / "ckpt.pt"
        )
    else:
        assert saved == {} and loaded == {}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    run_on_two_ranks(_two_rank_worker, str(out))
    return out


def test_two_gloo_ranks_match_single_process_gradients(two_rank_run: Path) -> None:
    """Fails without the pytorch#162338 guard if gloo sums instead of averaging."""
    sharded = torch.load(two_rank_run / "grads.pt")
    reference = _tiny_llama()
    input_ids = _batch()
    reference(input_ids=input_ids, labels=input_ids).loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}
    assert sharded.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(sharded[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_two_rank_checkpoint_round_trip(two_rank_run: Path) -> None:
    result = torch.load(two_rank_run / "ckpt.pt")
    assert result["meta"] == {"step": 3, "extra": {"tag": "x"}, "world_size": 2}
    assert Path(result["path"]).name == "step_00000003"
    assert result["total"] == 3.0  # all_reduce_sum_ over ranks 1 + 2
    saved, loaded = result["saved"], result["loaded"]
    assert saved.keys() == loaded.keys() and saved
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key

    # DCP reshards: the 2-rank checkpoint loads into one unsharded process too.
    single = _tiny_llama(seed=2)
    fd.load_checkpoint(Path(result["path"]), single, torch.optim.AdamW(single.parameters()))
    for key, value in single.state_dict().items():
        assert torch.equal(value, saved[key]), key


# --------------------------------------------------------------------------- Ray Train


def _ray_train_loop(config: dict) -> None:
    """Per-worker loop: plain PyTorch plus flexkd.distributed, as a stage would write it."""
    import ray.train

    torch.set_num_threads(1)
    model = fd.shard_model(_tiny_llama(), trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = _train_steps(model, optimizer, steps=3)
    path = fd.save_checkpoint(Path(config["checkpoint_dir"]), model, optimizer, step=3)
    # Mean over ranks, so the reported number does not depend on which rank reports it.
    first_last = fd.all_reduce_sum_(torch.tensor([losses[0], losses[-1]])) / fd.world_size()
    metrics = {"first_loss": first_last[0].item(), "loss": first_last[1].item(), "world_size": fd.world_size()}
    # Ray Train V2 keeps in Result.metrics only what was reported with a checkpoint, taken
    # from rank 0; rank 0 alone hands over the (shared-filesystem) DCP directory.
    checkpoint = ray.train.Checkpoint.from_directory(path) if fd.is_main_process() else None
    ray.train.report(metrics, checkpoint=checkpoint)


def test_ray_train_run_shards_trains_and_checkpoints(local_ray, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    checkpoint_dir = tmp_path / "dcp"
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"checkpoint_dir": str(checkpoint_dir)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="distributed_test", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()

    assert result.error is None
    assert fd.latest_checkpoint(checkpoint_dir) == checkpoint_dir / "step_00000003"
    meta = json.loads((checkpoint_dir / "step_00000003" / fd.META_FILENAME).read_text())
    assert meta["world_size"] == 2
    assert result.metrics["world_size"] == 2
    assert math.isfinite(result.metrics["loss"])
    assert result.metrics["loss"] < result.metrics["first_loss"]
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as reported:
        assert (Path(reported) / fd.META_FILENAME).is_file()
