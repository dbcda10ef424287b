"""The pipeline schema: good files load, bad ones fail with one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flexkd.cli import main
from flexkd.config.schema import ConfigError, load_config, parse_config, stable_hash
from flexkd.models.loading import TINY_TOKENIZER_DIR, build_random_model, load_tokenizer
from flexkd.models.plan import plan_models
from flexkd.pipeline.preflight import preflight
from flexkd.pipeline.runner import fingerprinted_config
from flexkd.stages.evaluate import teacher_results_file

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def debug_raw() -> dict:
    """The debug pipeline with its paths made absolute, so it can be written anywhere."""
    return load_config(PIPELINES / "debug.yaml").model_dump(mode="json")


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "name", ["debug.yaml", "quickstart.yaml", "sst2.yaml", "instruct_samsum.yaml", "samsum_seqkd.yaml", "llama8b.yaml"]
)
def test_shipped_pipelines_validate(name):
    config = load_config(PIPELINES / name)
    assert config.name
    assert Path(config.data.train.path).is_absolute()  # anchored to the pipeline file, not the cwd


def test_relative_paths_resolve_against_the_file(tmp_path):
    raw = yaml.safe_load((PIPELINES / "debug.yaml").read_text())
    raw["data"]["train"]["path"] = "data/train.jsonl"
    config = load_config(write(tmp_path, raw))
    assert config.data.train.path == str(tmp_path / "data" / "train.jsonl")


def test_a_transfer_split_is_a_path_resolved_like_the_others_and_needs_classification(tmp_path):
    raw = yaml.safe_load((PIPELINES / "debug.yaml").read_text())
    raw["data"]["transfer"] = {"path": "data/unlabeled.jsonl", "limit": 64}
    config = load_config(write(tmp_path, raw))
    assert config.data.transfer.path == str(tmp_path / "data" / "unlabeled.jsonl")
    assert load_config(PIPELINES / "debug.yaml").data.transfer is None
    raw["task"] = {"kind": "generation", "prompt_template": "{sentence}", "response_column": "label"}
    with pytest.raises(ConfigError, match="data.transfer .* needs task.kind 'classification'"):
        load_config(write(tmp_path, raw))


def test_fingerprint_is_stable_and_sensitive():
    first, second = parse_config(debug_raw()), parse_config(debug_raw())
    assert first.fingerprint() == second.fingerprint()
    changed = debug_raw()
    changed["loss"]["gamma"] = 0.5
    assert parse_config(changed).fingerprint() != first.fingerprint()


def test_a_retired_setting_is_refused_by_name_and_still_hashed_as_before(tmp_path):
    """task.text_column was never read and is gone; outputs named by hashes of configs that had it
    must still be found, so the hashes put it back at the value it always had."""
    config = parse_config(debug_raw())
    dumped_before = config.model_dump(mode="json")  # as the schema dumped it before on_policy came
    dumped_before["task"]["text_column"] = "text"
    for setting in ("on_policy", "on_policy_max_new_tokens", "on_policy_temperature"):
        del dumped_before["training"][setting]
    assert config.fingerprint() == stable_hash(dumped_before)
    assert fingerprinted_config(config, "tokenize")["task"]["text_column"] == "text"
    teacher_scores_key_before = stable_hash(
        {
            "teacher": config.teacher.model_dump(mode="json"),
            "task": config.task.model_dump(mode="json") | {"text_column": "text"},
            "evaluation": config.evaluation.model_dump(mode="json"),
            "eval_dir": "eval",
        }
    )
    assert teacher_results_file(config, "eval", tmp_path) == tmp_path / f"{teacher_scores_key_before}.json"
    raw = debug_raw()
    raw["task"]["text_column"] = "sentence"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, raw))
    assert str(caught.value) == f"{tmp_path / 'pipeline.yaml'}: task.text_column: removed: flexkd never read it"


def one_error(raw: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        preflight(load_config(write(tmp_path, raw)))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_unknown_key_names_the_field(tmp_path):
    raw = debug_raw()
    raw["loss"]["gama"] = 1.0
    assert one_error(raw, tmp_path) == f"{tmp_path / 'pipeline.yaml'}: loss.gama: unknown key"


def test_text_that_yaml_read_as_a_mapping_says_to_quote_it(tmp_path):
    raw = debug_raw()
    raw["task"]["prompt_template"] = {"Review": {"sentence": None}}  # Review: {sentence}, unquoted
    message = one_error(raw, tmp_path)
    assert message.startswith(f"{tmp_path / 'pipeline.yaml'}: task.prompt_template: Input should be a valid string")
    assert "not a mapping; quote text" in message


@pytest.mark.parametrize("feature_off", [{"gamma": 0.0}, {"feature": "none"}])
def test_losses_that_would_not_train_the_student_are_refused(tmp_path, feature_off):
    raw = debug_raw()
    raw["loss"] |= {"alpha": 0.0, "beta": 0.0} | feature_off
    assert one_error(raw, tmp_path).endswith("are all 0: nothing would train the student")
    raw["loss"]["beta"] = 0.5  # logit KD alone trains it
    parse_config(raw, str(tmp_path / "pipeline.yaml"))


def test_wrong_type_names_the_field(tmp_path):
    raw = debug_raw()
    raw["training"]["steps"] = "many"
    message = one_error(raw, tmp_path)
    assert "training.steps" in message and "integer" in message


def test_unknown_choice_names_the_field(tmp_path):
    raw = debug_raw()
    raw["loss"]["logit"] = "kl"
    assert "loss.logit" in one_error(raw, tmp_path)
    raw = debug_raw()
    raw["training"]["precision"] = "fp16"
    message = one_error(raw, tmp_path)
    assert "training.precision" in message and "bf16" in message


def test_k_larger_than_student_is_refused(tmp_path):
    raw = debug_raw()
    raw["selection"]["k"] = 33  # the debug student is 32 wide
    message = one_error(raw, tmp_path)
    assert message.startswith("selection.k") and "32" in message


def test_layer_out_of_range_is_refused(tmp_path):
    raw = debug_raw()
    raw["layer_map"] = [[2, 1], [9, 2]]  # the debug teacher has 4 blocks
    message = one_error(raw, tmp_path)
    assert message.startswith("layer_map[1]") and "9" in message


def test_tokenizer_mismatch_is_refused(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    tokenizer.add_tokens(["<an-extra-token>"])
    student = build_random_model(
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
        },
        vocab_size=len(tokenizer),
        seed=0,
    )
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    raw = debug_raw()
    raw["student"] = {"init": "pretrained", "path": str(tmp_path / "student")}
    message = one_error(raw, tmp_path)
    assert message.startswith("student.path: tokenizer mismatch") and "vocabulary" in message


def test_missing_required_section(tmp_path):
    raw = debug_raw()
    del raw["task"]
    assert ": task: Field required" in one_error(raw, tmp_path)


def test_random_teacher_needs_architecture(tmp_path):
    raw = debug_raw()
    del raw["teacher"]["architecture"]
    assert "teacher: source 'random' needs teacher.architecture" in one_error(raw, tmp_path)


def test_plan_of_the_debug_pipeline():
    plan = plan_models(load_config(PIPELINES / "debug.yaml"))
    assert (plan.teacher_hidden, plan.student_hidden, plan.k) == (64, 32, 32)
    assert plan.layer_pairs == ((2, 1), (4, 2))


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    raw = debug_raw()
    raw["selection"]["k"] = 1000
    assert main(["validate", str(write(tmp_path, raw))]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("flexkd: config error: selection.k") and "\n" not in error


def test_cli_set_values_are_data_not_code(tmp_path, capsys):
    """Evaluated, the first value would write a file and give a valid gamma (0.5); loaded with
    YAML's Python tags, the second would make a folder. As data, both are refused."""
    evaluated, tagged = tmp_path / "evaluated", tmp_path / "tagged"
    code = f"__import__('pathlib').Path('{evaluated}').write_text('x') and 0.5"
    assert main(["validate", str(PIPELINES / "debug.yaml"), "--set", f"loss.gamma={code}"]) == 2
    assert "loss.gamma" in capsys.readouterr().err
    assert not evaluated.exists()
    tag = f"!!python/object/apply:os.mkdir ['{tagged}']"
    assert main(["validate", str(PIPELINES / "debug.yaml"), "--set", f"loss.gamma={tag}"]) == 2
    assert "loss.gamma" in capsys.readouterr().err
    assert not tagged.exists()
