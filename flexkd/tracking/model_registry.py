"""How a distilled student is packaged as an MLflow model, and how to get it back as a folder.

The student is an MLflow ``pyfunc`` model whose one artifact is the Hugging Face folder written
by distill (safetensors, config, tokenizer), copied byte for byte. So a registered version
loads as a pyfunc (``mlflow.pyfunc.load_model(uri).predict(prompts)`` gives greedy completions),
and its files load with plain ``transformers`` after :func:`download_registered_student`.

Why not ``mlflow.transformers.log_model(transformers_model=<folder>)``: with transformers 5
MLflow 3.17 fails on a local checkpoint path (``flavor_config.py``: ``'str' object has no
attribute '__name__'``: transformers 5 names pipeline classes by string), and MLflow supports
transformers only up to 4.x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch
import transformers
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from transformers import AutoModelForCausalLM, AutoTokenizer

import flexkd

STUDENT_ARTIFACT = "student"  # the artifact key of the Hugging Face folder inside the MLflow model


class DistilledStudent(mlflow.pyfunc.PythonModel):
    """The registered student as a pyfunc: a list of prompts in, their greedy completions out
    (``max_new_tokens`` from the model config)."""

    def load_context(self, context) -> None:
        folder = context.artifacts[STUDENT_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        self.max_new_tokens = int(context.model_config.get("max_new_tokens", 64))

    def predict(self, context, model_input: list[str]) -> list[str]:
        completions = []
        for prompt in model_input:  # one prompt at a time: no padding, so no padding side to get wrong
            encoded = self.tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                generated = self.model.generate(
                    **encoded,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            completions.append(
                self.tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        return completions


def log_student(student_dir: str | Path, max_new_tokens: int, name: str = STUDENT_ARTIFACT) -> ModelInfo:
    """Log ``student_dir`` as the MLflow model ``name`` of the active run; returns its ModelInfo
    (``model_uri`` is what to register). Any Hugging Face causal-LM folder packs the same way (the
    adapt stage logs the adapted teacher as ``teacher``)."""
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=DistilledStudent(),
        artifacts={STUDENT_ARTIFACT: str(student_dir)},
        model_config={"max_new_tokens": max_new_tokens},
        # DistilledStudent is pickled by reference to flexkd.registry: ship the (small) package
        # with the model so that it also loads where flexkd is not installed.
        code_paths=[str(Path(flexkd.__file__).parent)],
        # Stated, not inferred: inference would load the model in a subprocess just to list imports.
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"transformers=={transformers.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            "safetensors",
        ],
    )


def hf_subdir(flavors: dict[str, Any]) -> str:
    """The folder, relative to a saved student model, that holds the Hugging Face files
    (``artifacts/student``), read from the model's flavors (``ModelInfo.flavors``, or the MLmodel
    file of a download) rather than assumed."""
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    if STUDENT_ARTIFACT not in artifacts:
        raise ValueError(f"not a flexkd student: no '{STUDENT_ARTIFACT}' artifact in its python_function flavor")
    return artifacts[STUDENT_ARTIFACT]["path"]


def download_registered_student(model_uri: str, destination: str | Path) -> Path:
    """Download a registered student (e.g. ``models:/my-pipeline-student/3``) into ``destination``.

    Returns the folder inside the download that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))
    folder = model_dir / hf_subdir(Model.load(str(model_dir)).flavors)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_uri}: downloaded to {model_dir}, but {folder} has no config.json")
    return folder
