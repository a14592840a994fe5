"""Malformed inputs through the real CLI: one clear line on stderr naming the culprit, exit code 2, no traceback.

Every case runs `logitsam.cli.main` in-process. Data and config mistakes are caught before any model is
loaded, so the train cases need no model at all (the model path is an empty directory that is never read).
"""

import json
import logging
import subprocess
import sys

import datasets
import pytest
import torch
import transformers
from conftest import cli_error_line, make_tiny_llama, make_tiny_tokenizer

from logitsam.cli import check_before_loading, main, parse_overrides
from logitsam.train import build_config

# transformers binds its log handler to the sys.stderr of its first use. Make that pytest's session-wide
# capture, not one test's capsys stream, which is closed after that test (and then logs "Traceback"s).
transformers.utils.logging.get_logger("transformers")
datasets.utils.logging.get_logger("datasets")

GOOD = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _train_argv(overrides: dict) -> list[str]:
    return ["train", *(str(t) for key, value in overrides.items() for t in (f"--{key}", value))]


def fails(argv, capsys) -> str:
    """Run the CLI, expect a user error, and return its one stderr line."""
    if isinstance(argv, dict):
        argv = _train_argv(argv)
    return cli_error_line(argv, capsys)


@pytest.fixture
def train(tmp_path):
    """`logitsam train` overrides with everything but the data; the failing cases never read the model dir."""
    model = tmp_path / "model"
    model.mkdir()
    return {"model_name_or_path": model, "output_dir": tmp_path / "out", "use_cpu": "true", "report_to": "none",
            "max_length": 32, "max_prompt_length": 16, "eval_size": 0, "on_invalid": "error", "max_steps": 1}


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(_jsonl(*[{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(8)]))
    return path


# ---------------------------------------------------------------------------------------------------
# Data: (file name, file bytes, fragments the message must hold); the bad row is row 1 (line 2)

DATA_CASES = {
    "wrong_type": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": 5, "rejected": "b"}),
                   ["row 1, field 'chosen'", "expected a string, got int", "[wrong_type]"]),
    "row_not_an_object": ("p.jsonl", _jsonl(GOOD) + b'["Q:", "a", "b"]\n',
                          ["row 1:", "expected a JSON object, got list", "[wrong_type]"]),
    "prompt_wrong_type": ("p.jsonl", _jsonl(GOOD, {"prompt": ["Q:"], "chosen": "a", "rejected": "b"}),
                          ["row 1, field 'prompt'", "expected a string, got list"]),
    "missing_column": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": "a"}),
                       ["row 1, field 'rejected'", "missing (the row's columns: prompt, chosen)", "[missing_field]"]),
    "misspelled_extra_column": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": "a", "rejectd": "b"}),
                                ["row 1, field 'rejected'", "did you mean 'rejectd'?"]),
    "null_field": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": None, "rejected": "b"}),
                   ["row 1, field 'chosen'", "null", "[missing_field]"]),
    "empty_string": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": "", "rejected": "b"}),
                     ["row 1, field 'chosen'", "[empty_response]"]),
    "whitespace_only": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": "a", "rejected": " \n\t"}),
                        ["row 1, field 'rejected'", "whitespace-only", "[empty_response]"]),
    "identical_pair": ("p.jsonl", _jsonl(GOOD, {"prompt": "Q:", "chosen": "same", "rejected": "same "}),
                       ["row 1, field 'rejected'", "same text as 'chosen'", "[identical_responses]"]),
    "bad_json_line": ("p.jsonl", _jsonl(GOOD) + b'{"prompt": "Q:", "chosen": \n',
                      ["row 1:", "line 2 is not valid JSON", "[invalid_json]"]),
    "only_bad_json": ("p.jsonl", b"not json\n",
                      ["row 0:", "line 1 is not valid JSON", "[invalid_json]"]),
    "non_utf8_line": ("p.jsonl", _jsonl(GOOD) + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n',
                      ["row 1:", "line 2 is not UTF-8 text (byte 0xff at column 13)", "[invalid_json]"]),
    "non_utf8_json_array": ("p.json", b'[{"prompt": "\xff"}]', ["p.json: not UTF-8 text (byte 0xff"]),
    "broken_json_array": ("p.json", b'[{"prompt": "Q:", "chosen": "a", "rejected": "b"},', ["p.json: not valid JSON"]),
    "wrong_message_role": ("c.jsonl", _jsonl({"chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot("b")]},
                                             {"chosen": [{"role": "tool", "content": "q"}, _bot("a")],
                                              "rejected": [_user("q"), _bot("b")]}),
                           ["row 1, field 'chosen'", "message 0 has role 'tool'", "[malformed_messages]"]),
    "last_turn_not_assistant": ("c.jsonl", _jsonl(
        {"chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot("b")]},
        {"chosen": [_user("q"), _bot("a")], "rejected": [_user("q")]}),
        ["row 1, field 'rejected'", "last message has role 'user'", "[malformed_messages]"]),
    "mismatched_conversational_prompts": ("c.jsonl", _jsonl(
        {"chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot("b")]},
        {"chosen": [_user("q"), _bot("a")], "rejected": [_user("Q?"), _bot("b")]}),
        ["row 1, field 'rejected'", "prompt turns differ", "[malformed_messages]"]),
    "message_without_content": ("c.jsonl", _jsonl({"prompt": "q", "chosen": [_bot("a")], "rejected": [_bot("b")]},
                                                  {"prompt": "q", "chosen": [{"role": "assistant"}],
                                                   "rejected": [_bot("b")]}),
                                ["row 1, field 'chosen'", "message 0 is not a", "[wrong_type]"]),
    "hh_transcript_without_assistant": ("h.jsonl", _jsonl(
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: b"}),
        ["row 1, field 'chosen'", "[unparseable_transcript]"]),
    "no_preference_columns": ("s.jsonl", _jsonl({"prompt": "a", "completion": "b"}),
                              ["cannot detect the data format", "no chosen or rejected column",
                               "(columns: completion, prompt)"]),
    "empty_file": ("p.jsonl", b"", ["p.jsonl: split 'train' has no rows"]),
    "blank_lines_only": ("p.jsonl", b"\n\n  \n", ["p.jsonl: split 'train' has no rows"]),
    "unsupported_file_type": ("p.csv", b"prompt,chosen,rejected\n", ["p.csv: unsupported file type"]),
    "not_gzip": ("p.jsonl.gz", _jsonl(GOOD), ["p.jsonl.gz: not a complete gzip file"]),
    "not_parquet": ("p.parquet", b"PAR1 not really", ["p.parquet: not a readable Parquet file"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_names_file_row_and_field(case, tmp_path, train, capsys):
    name, content, fragments = DATA_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    line = fails({**train, "dataset_name": path}, capsys)
    assert line.startswith(f"logitsam train: error: {path}")
    for fragment in fragments:
        assert fragment in line


def test_missing_file_and_directory_and_empty_split(tmp_path, train, pairs, capsys):
    missing = tmp_path / "nope.jsonl"
    assert fails({**train, "dataset_name": missing}, capsys).endswith(f"{missing}: no such file or directory")
    assert "no such file" in fails({**train, "dataset_name": "pairs_typo.jsonl.gz"}, capsys)
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    line = fails({**train, "dataset_name": folder}, capsys)
    assert f"{folder}: cannot load it as a local dataset folder or a hub dataset" in line
    assert "doesn't contain any data files" in line
    line = fails({**train, "dataset_name": pairs, "dataset_split": "train[20:]"}, capsys)
    assert line.endswith(f"{pairs}: split 'train[20:]' has no rows")
    line = fails({**train, "dataset_name": pairs, "dataset_split": "test"}, capsys)
    assert "split 'test': a local file holds only the 'train' split" in line


def test_drop_counts_every_reason_in_the_log(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_jsonl(GOOD, {"prompt": "Q:", "chosen": "x", "rejected": "x"}, {"prompt": "Q:", "chosen": 3})
                     + b"{oops\n" + _jsonl({"prompt": "Q:", "chosen": "a", "rejected": ""}, GOOD))
    cfg = build_config(None, {"dataset_name": str(path), "on_invalid": "drop", "eval_size": "0",
                              "model_name_or_path": str(tmp_path), "report_to": "none"})
    with caplog.at_level(logging.INFO, logger="logitsam.data"):
        check_before_loading(cfg)
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert summary == [f"{path}: kept 2 of 6 rows; dropped 4: empty_response=1 (rows 4); identical_responses=1 "
                       "(rows 1); invalid_json=1 (rows 3); wrong_type=1 (rows 2)"]


def test_drop_mode_with_nothing_left_names_the_counts(tmp_path, train, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_jsonl({"prompt": "Q:", "chosen": "x", "rejected": "x"}, {"prompt": "Q:", "chosen": "a"}))
    line = fails({**train, "dataset_name": path, "on_invalid": "drop"}, capsys)
    assert f"{path}: kept 0 of 2 rows; dropped 2: identical_responses=1 (rows 0); missing_field=1 (rows 1)" in line
    assert line.endswith("no valid preference pairs left")


def test_unused_columns_are_logged_not_dropped_silently(tmp_path, caplog):
    from logitsam.data import load_preference_examples

    path = tmp_path / "extra.jsonl"
    path.write_bytes(_jsonl({**GOOD, "score": 0.5, "source": "web"}))
    with caplog.at_level(logging.INFO, logger="logitsam.data"):
        examples, _ = load_preference_examples(path)
    assert len(examples) == 1
    assert f"{path}: format prompt_chosen_rejected; columns not used: score, source" in caplog.messages


# ---------------------------------------------------------------------------------------------------
# Config: (extra argv or a recipe, fragments)

CONFIG_CASES = {
    "unknown_key": ({"sam_roh": "0.1"}, ["unknown config key 'sam_roh' (on the command line)",
                                           "did you mean 'sam_rho'?"]),
    "unknown_trainer_key": ({"learning_rat": "1e-5"}, ["unknown config key 'learning_rat'",
                                                         "did you mean 'learning_rate'?"]),
    "wrong_type_float": ({"beta": "abc"}, ["config key 'beta' = 'abc' must be a number"]),
    "wrong_type_int": ({"max_steps": "1.5"}, ["config key 'max_steps' = '1.5' must be an integer"]),
    "wrong_type_bool": ({"use_peft": "maybe"}, ["config key 'use_peft' = 'maybe' must be true or false"]),
    "wrong_type_loss": ({"loss_type": "5"}, ["config key 'loss_type' = '5' is unknown", "Allowed: ["]),
    "wrong_type_list_item": ({"loss_weights": "[1.0, x]"}, ["config key 'loss_weights': item 'x' must be a number"]),
    "wrong_type_choice": ({"lr_scheduler_type": "cosin"}, ["config key 'lr_scheduler_type' = 'cosin' is not one of",
                                                           "'cosine'"]),
    "beta_zero": ({"beta": "0"}, ["config key 'beta' = 0.0 must be finite and > 0.0"]),
    "beta_nan": ({"beta": "nan"}, ["config key 'beta' = nan must be finite"]),
    "rho_negative": ({"sam": "logits", "sam_rho": "-1e-3"}, ["config key 'sam_rho' = -0.001 must be finite and >= 0"]),
    "lr_negative": ({"learning_rate": "-1e-5"}, ["config key 'learning_rate' = -1e-05 must be finite and >= 0"]),
    "batch_size_zero": ({"per_device_train_batch_size": "0"},
                        ["config key 'per_device_train_batch_size' = 0 must be finite and >= 1"]),
    "bad_choice": ({"sam": "partial"}, ["config key 'sam' = 'partial' is not one of ['none', 'logits', 'full']"]),
    "bad_data_format": ({"data_format": "csv"}, ["config key 'data_format' = 'csv' is not one of"]),
    "unknown_loss": ({"loss_type": "sigmiod"}, ["'loss_type' = 'sigmiod' is unknown; did you mean 'sigmoid'?"]),
    "removed_trl_key": ({"rpo_alpha": "1.0"}, ["config key 'rpo_alpha' (on the command line) is not supported",
                                                 "loss_weights"]),
    "removed_trl_key_2": ({"max_completion_length": "64"}, ["'max_completion_length'", "use max_length"]),
    "conflict_lengths": ({"max_prompt_length": "32"}, ["'max_prompt_length' = 32 and 'max_length' = 32 conflict"]),
    "conflict_sam_modes": ({"sam_adaptive": "true", "sam_asam": "true"},
                           ["'sam_adaptive' and 'sam_asam' are exclusive"]),
    "conflict_alias": ({"rho": "0.1", "sam_rho": "0.2"}, ["config keys 'rho' and 'sam_rho'", "both set 'sam_rho'"]),
    "conflict_loss_weights": ({"loss_type": "[sigmoid, sft]", "loss_weights": "[1.0]"},
                              ["'loss_weights' = [1.0] and 'loss_type' = ['sigmoid', 'sft'] conflict"]),
    "conflict_loss_param": ({"simpo_gamma": "0.5"}, ["config key 'simpo_gamma' = 0.5 is not used by loss_type "
                                                       "'sigmoid'", "it applies to: simpo"]),
    "conflict_eval": ({"eval_strategy": "steps"}, ["'eval_strategy' = 'steps' needs eval data",
                                                     "'eval_size' is 0"]),
    "bad_trainer_choice": ({"eval_size": "2", "eval_strategy": "sometimes"},
                           ["config key 'eval_strategy' = 'sometimes' is not one of ['no', 'steps', 'epoch']"]),
    "trainer_rejects_value": ({"fp16": "true", "bf16": "true"}, ["TrainingArguments: ", "fp16", "bf16"]),
    "label_smoothing_unused_by_sigmoid": ({"label_smoothing": "0.1"},
                                          ["config key 'label_smoothing' = 0.1 is not used by loss_type 'sigmoid'",
                                           "cDPO is loss_type: cdpo"]),
    "exo_pair_without_label_smoothing": ({"loss_type": "exo_pair"},
                                         ["config key 'label_smoothing' = 0.0: loss_type 'exo_pair' needs 0 < "
                                          "label_smoothing < 1", "1e-3"]),
    "cdpo_label_smoothing_too_large": ({"loss_type": "cdpo", "label_smoothing": "0.5"},
                                       ["loss_type 'cdpo' needs 0 <= label_smoothing < 0.5"]),
    "eval_size_fraction_count": ({"eval_size": "2.5"}, ["'eval_size' = 2.5: a count (>= 1) must be a whole number"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_names_key_value_and_allowed(case, train, pairs, capsys):
    overrides, fragments = CONFIG_CASES[case]
    line = fails({**train, "dataset_name": pairs, **overrides}, capsys)
    assert line.startswith("logitsam train: error: ")
    for fragment in fragments:
        assert fragment in line


def test_bad_recipe_files_are_named(tmp_path, train, pairs, capsys):
    recipe = tmp_path / "r.yaml"
    with_recipe = {**train, "dataset_name": pairs, "config": recipe}
    recipe.write_text("beta: 0.1\nsam_roh: 1e-3\n")
    assert f"unknown config key 'sam_roh' (in {recipe}); did you mean 'sam_rho'?" in fails(with_recipe, capsys)
    recipe.write_text("beta: 0.1\nsam: [logits\n")
    assert fails(with_recipe, capsys).startswith(f"logitsam train: error: {recipe}: line 3")
    recipe.write_text("- beta\n- 0.1\n")
    assert f"{recipe}: a recipe must be a mapping of key: value, got list" in fails(with_recipe, capsys)
    recipe.write_text("rho: 0.1\nsam_rho: 0.2\n")
    assert f"config keys 'rho' and 'sam_rho' (in {recipe}) both set 'sam_rho'" in fails(with_recipe, capsys)
    missing = tmp_path / "none.yaml"
    assert f"config file '{missing}': not found" in fails({**with_recipe, "config": missing}, capsys)
    assert "is a directory" in fails({**with_recipe, "config": tmp_path}, capsys)


def test_command_line_beats_recipe_without_a_conflict(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sam_rho: 0.2\n")
    assert build_config(recipe, {"rho": "0.1"}).sam_rho == 0.1


def test_dataset_name_is_required(train, capsys):
    assert "config key 'dataset_name' is required" in fails(train, capsys)


# ---------------------------------------------------------------------------------------------------
# Command line


def test_trailing_flag_without_value_is_an_error(train, pairs, capsys):
    base = _train_argv({**train, "dataset_name": pairs})
    assert fails([*base, "--seed"], capsys) == ("logitsam train: error: --seed needs a value (e.g. --seed VALUE); "
                                                "only true/false keys may stand alone")
    del train["max_steps"]
    base = _train_argv({**train, "dataset_name": pairs})
    assert "--max_steps needs a value" in fails([*base, "--max_steps"], capsys)
    assert "--max_steps needs a value" in fails([*base, "--max_steps", "--seed", "1"], capsys)


def test_bare_boolean_flags_still_mean_true():
    assert parse_overrides(["--use_cpu", "--beta", "0.2", "--bf16"]) == {"use_cpu": "true", "beta": "0.2",
                                                                        "bf16": "true"}
    assert parse_overrides(["--learning_rate", "-1e-5", "--max-steps=3"]) == {"learning_rate": "-1e-5",
                                                                              "max_steps": "3"}


def test_stray_and_repeated_tokens(train, pairs, capsys):
    base = _train_argv({**train, "dataset_name": pairs})
    assert "expected --key value, got 'oops'" in fails([*base, "oops"], capsys)
    assert "--max_steps is given twice on the command line" in fails([*base, "--max_steps", "2"], capsys)


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--model", "m", "--dataset_name", "d.jsonl", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["eval", "--model", "m", "--dataset_name", "d.jsonl", "--num_prompts", "-1"], "-1 is not >= 0"),
    (["eval", "--model", "m", "--dataset_name", "d.jsonl", "--judge", "gpt4"], "'gpt4' is not 'vader' or 'reward:"),
    (["eval", "--model", "m", "--dataset_name", "d.jsonl", "--batch_size", "x"], "argument --batch_size: invalid"),
    (["eval", "--model", "m", "--dataset_name", "d.jsonl", "--prompts_file", "nope.jsonl"], "nope.jsonl: no such file"),
    (["report", "no/such/run"], "no/such/run: no such file or directory"),
    (["ches", "--dataset_name", "d.jsonl", "--max_samples", "0"], "0 is not >= 1"),
    (["report", "no/such/run", "--output_dir", "out"], "no/such/run: no such file or directory"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
])
def test_bad_flags_are_usage_errors(argv, fragment, capsys):
    line = fails(argv, capsys)
    assert fragment in line


def test_debug_shows_the_traceback_and_bugs_keep_theirs(train, pairs, monkeypatch):
    from logitsam.train.config import ConfigError

    with pytest.raises(ConfigError, match="sam_roh"):
        main([*_train_argv({**train, "dataset_name": pairs, "sam_roh": 1}), "--debug"])
    monkeypatch.setenv("LOGITSAM_DEBUG", "1")
    with pytest.raises(ConfigError, match="sam_roh"):
        main(_train_argv({**train, "dataset_name": pairs, "sam_roh": 1}))
    monkeypatch.delenv("LOGITSAM_DEBUG")

    def bug(cfg):
        raise KeyError("an internal bug")

    monkeypatch.setattr("logitsam.cli.check_before_loading", bug)
    with pytest.raises(KeyError, match="an internal bug"):  # not turned into a one-line user error
        main(_train_argv({**train, "dataset_name": pairs}))


# ---------------------------------------------------------------------------------------------------
# Models


def test_missing_model_paths_are_named(tmp_path, train, pairs, capsys):
    line = fails({**train, "dataset_name": pairs, "model_name_or_path": "./no/such/model"}, capsys)
    assert line == ("logitsam train: error: model path './no/such/model' does not exist "
                    "(embedded models: ['smollm2-135m-instruct'])")
    line = fails({**train, "dataset_name": pairs, "ref_model_name_or_path": tmp_path / "no-ref"}, capsys)
    assert f"model path '{tmp_path / 'no-ref'}' does not exist" in line
    line = fails(["eval", "--model", tmp_path / "gone", "--dataset_name", pairs], capsys)
    assert f"model path '{tmp_path / 'gone'}' does not exist" in line


def test_directory_without_model_files(train, pairs, capsys):
    line = fails({**train, "dataset_name": pairs}, capsys)  # the fixture's model dir is empty
    assert f"cannot load the tokenizer of '{train['model_name_or_path']}'" in line


def _save(model, path):
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_model_without_lm_head_is_refused(tmp_path, train, pairs, capsys):
    from transformers import LlamaModel

    base = make_tiny_llama(vocab_size=len(make_tiny_tokenizer()), tie=False).config
    path = _save(LlamaModel(base), tmp_path / "base-model")
    line = fails({**train, "dataset_name": pairs, "model_name_or_path": path}, capsys)
    assert f"'{path}' has no LM head weights (lm_head.weight missing from the checkpoint" in line


def test_logit_softcapping_model_is_refused(tmp_path, train, pairs, monkeypatch, capsys):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    config = Gemma2Config(vocab_size=len(make_tiny_tokenizer()), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    path = _save(Gemma2ForCausalLM(config), tmp_path / "gemma2")
    line = fails({**train, "dataset_name": pairs, "model_name_or_path": path}, capsys)
    assert "Gemma2ForCausalLM" in line and "final_logit_softcapping=30.0" in line
    assert "does not compute its logits as hidden @ W^T" in line  # the numeric check on the first batch
    line = fails(["eval", "--model", path, "--dataset_name", pairs, "--split", "train", "--max_length", "32",
                  "--max_prompt_length", "16", "--output_dir", tmp_path / "eval"], capsys)
    assert line.startswith(f"logitsam eval: error: '{path}' (Gemma2ForCausalLM) does not compute its logits")


def test_lora_on_the_lm_head_is_refused(tmp_path, train, pairs, monkeypatch, capsys):
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    path = _save(make_tiny_llama(vocab_size=len(make_tiny_tokenizer())), tmp_path / "llama")
    line = fails({**train, "dataset_name": pairs, "model_name_or_path": path, "use_peft": "true",
                  "lora_target_modules": "[q_proj, lm_head]"}, capsys)
    assert "the LM head 'lm_head' carries a PEFT adapter" in line
    assert "Exclude lm_head from lora_target_modules" in line


# ---------------------------------------------------------------------------------------------------
# eval


def test_eval_num_prompts_zero_skips_the_win_rate(tmp_path, pairs, caplog, capsys):
    tok = make_tiny_tokenizer()
    policy, ref = (_save(make_tiny_llama(vocab_size=len(tok), tie=True, seed=s), tmp_path / f"m{s}") for s in (0, 1))
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO, logger="logitsam.eval"):
        main(["eval", "--model", str(policy), "--ref_model", str(ref), "--dataset_name", str(pairs), "--split", "train",
              "--num_prompts", "0", "--max_length", "32", "--max_prompt_length", "16", "--output_dir", str(out)])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval/num_pairs"] == 8
    assert not any(k.startswith("winrate/") for k in results)
    assert "judged win rate skipped: num_prompts=0" in caplog.messages


def test_eval_bad_prompts_file_names_line_and_field(tmp_path, pairs, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(_jsonl({"prompt": "hi"}, {"text": "no prompt field"}))
    line = fails(["eval", "--model", "m", "--dataset_name", pairs, "--prompts_file", prompts], capsys)
    assert line.endswith(f"{prompts}: line 2, field 'prompt': expected a non-empty string or message list, got None")
    prompts.write_bytes(b'{"prompt": "hi"}\n{"prompt": \n')
    line = fails(["eval", "--model", "m", "--dataset_name", pairs, "--prompts_file", prompts], capsys)
    assert f"{prompts}: line 2 is not a UTF-8 JSON line" in line


def test_eval_bad_device(tmp_path, pairs, capsys):
    line = fails(["eval", "--model", "m", "--dataset_name", pairs, "--device", "gpu0"], capsys)
    assert line.endswith("argument --device: 'gpu0' is not a torch device (cpu, cuda, cuda:1, mps, ...)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_cuda_device_without_cuda(tmp_path, pairs, capsys):
    line = fails(["eval", "--model", "m", "--dataset_name", pairs, "--device", "cuda"], capsys)
    assert line == "logitsam eval: error: argument --device: 'cuda': CUDA is not available on this machine"


EVAL = ["eval", "--model", "m", "--dataset_name", "d.jsonl"]
CHES = ["ches", "--model", "m", "--dataset_name", "d.jsonl"]


@pytest.mark.parametrize("argv, line", [
    ([*EVAL, "--dtype", "fp8"],
     "logitsam eval: error: argument --dtype: 'fp8' is not one of float32, bfloat16, float16, auto"),
    ([*CHES, "--dtype", "bf16"],
     "logitsam ches: error: argument --dtype: 'bf16' is not one of float32, bfloat16, float16, auto"),
    ([*EVAL, "--sam_chunk_size", "0"],
     "logitsam eval: error: argument --sam_chunk_size: '0' must be an integer >= 1, null (dense head) or auto"),
    ([*EVAL, "--sam_chunk_size", "big"],
     "logitsam eval: error: argument --sam_chunk_size: 'big' must be an integer >= 1, null (dense head) or auto"),
    ([*EVAL, "--sam_vocab_chunk_size", "auto"], "logitsam eval: error: argument --sam_vocab_chunk_size: 'auto' "
                                                "must be an integer >= 1 or null (the whole vocabulary)"),
    ([*EVAL, "--use_cpu", "maybe"], "logitsam eval: error: argument --use_cpu: 'maybe' is not true or false"),
    ([*CHES, "--use_cpu", "2"], "logitsam ches: error: argument --use_cpu: '2' is not true or false"),
    ([*CHES, "--sam_chunk_size", "8"], "logitsam: error: unrecognized arguments: --sam_chunk_size 8"),  # no head
    ([*EVAL, "--use_cpu", "--device", "mps"],
     "logitsam eval: error: --use_cpu true and --device mps conflict; keep one"),
    ([*CHES, "--use_cpu", "yes", "--device", "mps"],
     "logitsam ches: error: --use_cpu true and --device mps conflict; keep one"),
])
def test_bad_device_dtype_and_chunking_flags(argv, line, capsys):
    """One line naming the flag, the value and what is allowed; no model or data is read."""
    assert fails(argv, capsys) == line


def test_eval_and_ches_flags_take_trains_values():
    """--dtype takes TrainConfig.dtype's values; the chunk sizes and use_cpu read as train reads them."""
    import typing

    from logitsam.cli import DTYPES, build_parser
    from logitsam.train.config import TrainConfig

    assert DTYPES == typing.get_args(typing.get_type_hints(TrainConfig)["dtype"])
    parser = build_parser()
    args = parser.parse_args([*EVAL, "--sam_chunk_size", "null", "--sam_vocab_chunk_size", "null", "--use_cpu"])
    assert (args.sam_chunk_size, args.sam_vocab_chunk_size, args.use_cpu) == (None, None, True)
    args = parser.parse_args([*EVAL, "--sam_chunk_size", "256", "--use_cpu", "false", "--dtype", "auto"])
    assert (args.sam_chunk_size, args.sam_vocab_chunk_size, args.use_cpu, args.dtype) == (256, 8192, False, "auto")
    args = parser.parse_args(EVAL)  # train's defaults
    assert (args.sam_chunk_size, args.sam_vocab_chunk_size, args.use_cpu, args.dtype, args.device) == \
        ("auto", 8192, False, "float32", None)
    assert parser.parse_args([*CHES, "--use_cpu", "--dtype", "bfloat16"]).dtype == "bfloat16"


def test_eval_missing_data_is_named_before_loading_a_model(tmp_path, capsys):
    line = fails(["eval", "--model", "never-loaded", "--dataset_name", tmp_path / "d.jsonl"], capsys)
    assert line == f"logitsam eval: error: {tmp_path / 'd.jsonl'}: no such file or directory"


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """What a user sees at the console: no traceback, one line on stderr, exit status 2."""
    missing = tmp_path / "pairs.jsonl"
    proc = subprocess.run([sys.executable, "-m", "logitsam.cli", "train", "--dataset_name", str(missing),
                           "--model_name_or_path", str(tmp_path), "--max_steps"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == ("logitsam train: error: --max_steps needs a value (e.g. --max_steps VALUE); only "
                           "true/false keys may stand alone\n")


def test_readme_eval_and_ches_examples_parse():
    """Every `logitsam eval` / `logitsam ches` command the README shows parses with the flags as they are now."""
    import re
    import shlex
    from pathlib import Path

    from logitsam.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"(?:`|^)(logitsam (?:eval|ches) [^`\n]+)", text, re.M)
    assert {c.split()[1] for c in commands} == {"eval", "ches"}, commands
    parser = build_parser()
    for command in commands:
        args, extra = parser.parse_known_args(shlex.split(command)[1:])
        assert not extra, command
