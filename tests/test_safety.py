"""Safe defaults: loopback-only services, no pickles, no remote code, no code in config values,
no secrets in what is logged."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexkd.cli import main
from flexkd.cluster import local
from flexkd.config.schema import ConfigError, apply_overrides, load_config, parse_config
from flexkd.errors import StageError
from flexkd.models.loading import load_model
from flexkd.models.plan import load_pipeline_tokenizer, load_teacher, teacher_model_config
from flexkd.pipeline import runner
from flexkd.stages import tokenize as tokenize_stage
from flexkd.tracking.runs import public_config, redact_value, ui_command

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = REPO_ROOT / "pipelines"
# flexkd/stages is a link to stages/: each file once, under its real path.
PACKAGE_FILES = sorted(
    {path.resolve() for folder in ("flexkd", "stages", "benchmarks") for path in (REPO_ROOT / folder).rglob("*.py")}
)


def debug_config(root: Path, **overrides):
    raw = load_config(PIPELINES / "debug.yaml").model_dump(mode="json")
    raw = apply_overrides(
        raw, {"artifact_root": str(root), "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db", **overrides}
    )
    return parse_config(raw)


# --------------------------------------------------------------------------- loopback only

_LIST_LISTENING_SOCKETS = r"""
import json, os, sys
from pathlib import Path
import psutil
import ray  # imported first, as in any program that uses flexkd: the switch must still work
from flexkd.cluster.local import ensure_ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled

ensure_ray()

@ray.remote(num_cpus=0)
class Probe:
    def node_ip(self):
        return ray.util.get_node_ip_address()

probe = Probe.remote()  # an actor's own gRPC server is one more listener to check
node_ip = ray.get(probe.node_ip.remote())
me = psutil.Process()
sockets = []
for process in [me, *me.children(recursive=True)]:  # the Ray this driver started, nothing else
    try:
        name = process.name()
        sockets += [[c.laddr.ip, c.laddr.port, name] for c in process.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
print(json.dumps({"sockets": sockets, "token_auth": is_token_auth_enabled(), "node_ip": node_ip,
                  "gcs": ray.get_runtime_context().gcs_address,
                  "token_file_mode": token_file.stat().st_mode & 0o777 if token_file.is_file() else None}))
ray.shutdown()
"""


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_a_local_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    """Starts Ray the way `flexkd run` does, in its own process (the session's Ray is left alone),
    and lists every listening socket of every process of that Ray. Loopback servers are open to
    every local user, so the token must be on and its file private."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name
        not in (
            "RAY_ADDRESS",
            "RAY_AUTH_MODE",
            "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        )
    }
    env["HOME"] = str(tmp_path)  # Ray writes a fresh token to ~/.ray/auth_token, with the umask's mode
    run = subprocess.run(
        [sys.executable, "-c", _LIST_LISTENING_SOCKETS], env=env, capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in found["sockets"]}
    assert {"gcs_server", "raylet"} <= names and len(found["sockets"]) >= 6, found  # not vacuous
    exposed = [socket for socket in found["sockets"] if not _is_loopback(socket[0])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert found["node_ip"] == "127.0.0.1" and found["gcs"].startswith("127.0.0.1:")
    assert found["token_auth"] is True
    assert (tmp_path / ".ray" / "auth_token").is_file() and found["token_file_mode"] == 0o600
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # the switch did not leak into this process


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("ray://10.0.0.5:10001", ("10.0.0.5", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
        ("local", None),
    ],
)
def test_ray_addresses_are_parsed_for_the_reachability_check(address, expected):
    assert local._ray_host_port(address) == expected


def test_the_loopback_switch_is_restored_after_use():
    from ray._private import ray_constants

    before = (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))
    with local._loopback_only(True):
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")) == before


def test_the_mlflow_ui_command_binds_to_loopback():
    assert ui_command("sqlite:////x/mlflow.db").endswith("--host 127.0.0.1")


# --------------------------------------------------------------------------- no pickles, no remote code


def _calls(path: Path, attribute: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute
    ]


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def test_every_torch_load_in_the_package_is_weights_only():
    loads = [
        (path, call)
        for path in PACKAGE_FILES
        for call in _calls(path, "load")
        if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
    ]
    assert loads, "no torch.load found: the scan is broken"
    unsafe = [
        f"{path.relative_to(REPO_ROOT)}:{call.lineno}"
        for path, call in loads
        if not _keyword_is_true(call, "weights_only")
    ]
    assert unsafe == []
    pickles = [
        str(path.relative_to(REPO_ROOT))
        for path in PACKAGE_FILES
        if _calls(path, "loads") + _calls(path, "load") and "import pickle" in path.read_text()
    ]
    assert pickles == []


_MODEL_LOADS = [
    (path, call)
    for path in PACKAGE_FILES
    for call in _calls(path, "from_pretrained")
    if isinstance(call.func.value, ast.Name)
    and call.func.value.id.startswith("AutoModel")
    or isinstance(call.func.value, ast.Name)
    and call.func.value.id == "auto_class"
]


@pytest.mark.parametrize(
    "path, call", [pytest.param(path, call, id=f"{path.name}:{call.lineno}") for path, call in _MODEL_LOADS]
)
def test_every_model_load_asks_for_safetensors(path, call):
    """Either use_safetensors=True at the call, or models.load_model's own options dict."""
    in_load_model = path.name == "loading.py" and "options" in ast.unparse(call)
    assert _keyword_is_true(call, "use_safetensors") or in_load_model, ast.unparse(call)


def test_load_model_refuses_a_pickled_checkpoint_without_opening_it(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(tmp_path)
    marker = tmp_path / "unpickled"

    class OpensAFileWhenUnpickled:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"model.embed_tokens.weight": OpensAFileWhenUnpickled()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(tmp_path)
    assert not marker.exists()


def _custom_code_teacher(folder: Path) -> Path:
    """A model folder whose config needs code shipped with it; importing that code leaves a mark."""
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "custom-llama", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}})
    )
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(folder.parent / 'code-ran')!r}).touch()\n"
    )
    return folder


def test_trust_remote_code_is_off_unless_the_config_sets_it(tmp_path):
    teacher = _custom_code_teacher(tmp_path / "teacher")
    config = debug_config(
        tmp_path,
        **{
            "teacher.source": "hf",
            "teacher.path": str(teacher),
            "teacher.architecture": None,
            "teacher.tokenizer": None,
        },
    )
    assert config.teacher.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        teacher_model_config(config)
    assert not (tmp_path / "code-ran").exists()


def test_trust_remote_code_reaches_every_loader(tmp_path, monkeypatch):
    """What the config says is what transformers is told, for config, tokenizer and weights."""
    import transformers

    seen = []

    def record(kind):
        def fake(*args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code")))
            raise RuntimeError("recorded")

        return classmethod(lambda cls, *args, **kwargs: fake(*args, **kwargs))

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    (tmp_path / "teacher").mkdir()
    for trusted in (False, True):
        config = debug_config(
            tmp_path,
            **{
                "teacher.source": "hf",
                "teacher.path": str(tmp_path / "teacher"),
                "teacher.architecture": None,
                "teacher.tokenizer": None,
                "teacher.trust_remote_code": trusted,
            },
        )
        for load in (teacher_model_config, load_pipeline_tokenizer, load_teacher):
            with pytest.raises(RuntimeError, match="recorded"):
                load(config)
    assert seen == [(kind, trusted) for trusted in (False, True) for kind in ("config", "tokenizer", "model")]


# --------------------------------------------------------------------------- config is data


_RUNS_CODE = "!!python/object/apply:os.system ['touch {marker}']"


def test_a_python_tag_in_a_pipeline_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    text = (PIPELINES / "debug.yaml").read_text().replace("gamma: 1.0", "gamma: " + _RUNS_CODE.format(marker=marker))
    assert _RUNS_CODE.split()[0] in text
    (tmp_path / "pipeline.yaml").write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "pipeline.yaml")
    assert not marker.exists()


def test_a_python_tag_in_set_is_not_run(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    code = _RUNS_CODE.format(marker=marker)
    assert main(["validate", str(PIPELINES / "debug.yaml"), "--set", f"loss.gamma={code}"]) == 2
    assert not marker.exists()


def test_a_python_tag_in_set_is_the_documented_one_line_config_error(capsys):
    """The line docs/FAILURES.md shows."""
    assert (
        main(["validate", str(PIPELINES / "debug.yaml"), "--set", "loss.gamma=" + _RUNS_CODE.format(marker="x")]) == 2
    )
    assert capsys.readouterr().err == (
        "flexkd: config error: --set loss.gamma: not a YAML value (line 1, column 1: could not determine a "
        "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system')\n"
    )


def test_a_prompt_template_cannot_reach_attributes(tmp_path, capsys):
    """A format string may read any attribute of its arguments ({text.__class__...}); only plain
    column names are allowed: refused by preflight (flexkd validate) and again by the tokenize
    stage itself, which a config that skipped preflight reaches (before Ray starts)."""
    for template in ("Review: {sentence.__class__.__mro__}", "Review: {sentence[0]}"):
        field = template.removeprefix("Review: ")
        expected = f"task.prompt_template: '{field}' is not a column name; use {{column}} fields only"
        override = f"task.prompt_template='{template}'"  # quoted: unquoted, YAML reads a mapping
        assert main(["validate", str(PIPELINES / "debug.yaml"), "--set", override]) == 2
        assert capsys.readouterr().err == f"flexkd: config error: {expected}\n"
        config = load_config(PIPELINES / "debug.yaml", {"task.prompt_template": template})
        with pytest.raises(StageError) as caught:
            tokenize_stage.run(config, {}, tmp_path / "tokenize")
        assert str(caught.value) == f"tokenize: {expected}"
        assert not (tmp_path / "tokenize" / "train").exists()


# --------------------------------------------------------------------------- secrets

SECRETS = {
    "HF_TOKEN": "hf_secret_VALUE_4a1b",
    "MLFLOW_TRACKING_PASSWORD": "mlflow_secret_VALUE_5c2d",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_VALUE_6e3f",
    "WANDB_API_KEY": "wandb_secret_VALUE_7a4b",
}


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file under ``root`` (binary ones too: the SQLite store, checkpoints) holding a needle."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {needle}" for needle in needles if needle.encode() in data]
    return hits


def test_redaction_masks_passwords_tokens_and_signed_urls():
    assert redact_value("http://alice:s3cret@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert redact_value("https://ghp_token@github.com/org/repo") == "https://***@github.com/org/repo"
    assert redact_value("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1") == "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"
    assert redact_value("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"  # untouched
    config = debug_config(Path("/tmp"), **{"tracking.tracking_uri": "http://alice:s3cret@mlflow:5000"})
    public = public_config(config)
    assert public["tracking"]["tracking_uri"] == "http://alice:***@mlflow:5000"
    assert public["teacher"]["tokenizer"] == config.teacher.tokenizer  # "token" in a key is not a secret


def test_no_secret_from_the_environment_or_the_config_reaches_params_artifacts_or_manifests(
    tmp_path, local_ray, monkeypatch
):
    """A tracking URI with a password in the config, and tokens in the environment. The pipeline
    really logs to a local store (the runner's URI lookups are pointed at it), so params,
    config.yaml and the manifest are written and then searched byte by byte."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    config = debug_config(tmp_path, **{"tracking.tracking_uri": "http://alice:s3cret-pw@127.0.0.1:9"})
    real_use_experiment = runner.use_experiment
    local = debug_config(tmp_path, **{"tracking.tracking_uri": store})
    monkeypatch.setattr(runner, "tracking_uri", lambda _: store)
    monkeypatch.setattr(runner, "use_experiment", lambda _: real_use_experiment(local))

    result = runner.run_pipeline(config, stages=("tokenize",))

    import mlflow

    params = mlflow.get_run(result.run_id).data.params
    assert params["tracking.tracking_uri"] == "http://alice:***@127.0.0.1:9"
    manifest = json.loads((result.stages["tokenize"].directory / "manifest.json").read_text())
    assert manifest["config"]["tracking"]["tracking_uri"] == "http://alice:***@127.0.0.1:9"
    assert files_containing(tmp_path, ["s3cret-pw", *SECRETS.values()]) == []
