"""Config: precedence, TrainingArguments pass-through, clear errors."""

import pytest

from logitsam.train import build_config
from logitsam.train.config import TrainConfig


def test_precedence_defaults_yaml_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("beta: 0.2\nsam: logits\nlearning_rate: 1.0e-6\nmax_steps: 10\n")
    cfg = build_config(recipe, {"beta": "0.3", "max_steps": "20"})
    assert cfg.beta == 0.3 and cfg.sam == "logits" and cfg.sam_rho == TrainConfig().sam_rho
    assert cfg.training_args == {"learning_rate": 1e-6, "max_steps": 20}


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'sam_rho'"):
        build_config(None, {"sam_roh": "0.1"})
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        build_config(None, {"learning_rat": "0.1"})


def test_removed_trl_key_explains():
    with pytest.raises(ValueError, match="rpo_alpha.*loss_weights"):
        build_config(None, {"rpo_alpha": "1.0"})


def test_bad_values_name_key_and_value():
    with pytest.raises(ValueError, match="'sam' = 'partial'"):
        build_config(None, {"sam": "partial"})
    with pytest.raises(ValueError, match="'loss_type' = 'sigmiod'.*did you mean 'sigmoid'"):
        build_config(None, {"loss_type": "sigmiod"})
    with pytest.raises(ValueError, match="exclusive"):
        build_config(None, {"sam_adaptive": "true", "sam_asam": "true"})


def test_lists_and_aliases():
    cfg = build_config(None, {"loss_type": "[sigmoid, sft]", "loss_weights": "[1.0, 0.5]", "rho": "0.001"})
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_params() == {"loss_weights": [1.0, 0.5]}
    assert cfg.sam_rho == 0.001


def test_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert recipes, "no recipes found"
    for recipe in recipes:
        build_config(recipe)


def test_numbers_without_a_dot_are_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 5e-6\nsam_rho: 1e-4\n")
    cfg = build_config(recipe, {"beta": "2e-1", "max_steps": "7"})
    assert cfg.training_args == {"learning_rate": 5e-6, "max_steps": 7}
    assert cfg.sam_rho == 1e-4 and cfg.beta == 0.2


def test_yaml_words_stay_words_for_string_keys(tmp_path):
    """``--eval_strategy no`` is TrainingArguments' "no" strategy, not YAML 1.1's boolean False."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval_strategy: no\nbf16: no\n")
    cfg = build_config(recipe, {"save_strategy": "no", "use_cpu": "yes"})
    assert cfg.training_args["eval_strategy"] == "no" and cfg.training_args["save_strategy"] == "no"
    assert cfg.training_args["bf16"] is False and cfg.training_args["use_cpu"] is True


def test_command_line_forms_of_the_argument_table():
    """List keys take several values or a YAML list; --no_KEY negates a true/false key; --key=value and
    hyphenated spellings work; typed values (not strings) are read as YAML values are."""
    from logitsam.cli import parse_overrides

    tokens = ["--loss_type", "sigmoid", "sft", "--loss-weights=[1.0, 0.5]", "--no_precompute_ref_log_probs",
              "--use_cpu", "--lora_target_modules", "q_proj", "--max_steps", "3"]
    cfg = build_config(None, parse_overrides(tokens))
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert cfg.precompute_ref_log_probs is False and cfg.training_args == {"use_cpu": True, "max_steps": 3}
    assert cfg.lora_target_modules == ["q_proj"] and TrainConfig().lora_target_modules == "all-linear"
    cfg = build_config(None, {"loss_type": "ipo", "beta": 1, "max_steps": 2, "sam_chunk_size": 64})
    assert cfg.loss_type == ["ipo"] and cfg.beta == 1.0 and isinstance(cfg.beta, float) and cfg.sam_chunk_size == 64
    with pytest.raises(ValueError, match="'max_steps' = 2.5 must be an integer"):
        build_config(None, {"max_steps": 2.5})  # from YAML: never rounded silently
    with pytest.raises(ValueError, match="'use_cpu' = 1.0 must be true or false"):
        build_config(None, {"use_cpu": 1.0})


def test_help_lists_every_key_with_type_and_default(capsys):
    """`logitsam train --help` prints every TrainConfig and TrainingArguments field, typed, with our default."""
    import dataclasses

    from transformers import TrainingArguments

    from logitsam.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for cls in (TrainConfig, TrainingArguments):
        for f in dataclasses.fields(cls):
            if f.init and f.name != "training_args":
                assert f"--{f.name}" in out, f.name
    assert "--training_args" not in out
    assert "--beta FLOAT Inverse temperature" in out and "(default: 0.1)" in out
    assert "--sam {none,logits,full}" in out and "--loss_type STR [STR ...]" in out
    assert "--learning_rate FLOAT" in out and "(default: 1e-06)" in out  # TRL's, not transformers' 5e-05
    assert "--max_steps INT" in out and "--use_cpu [BOOL]" in out
    assert "rpo_alpha" in out and "rho -> sam_rho" in out  # removed keys and aliases in the epilog


def test_label_smoothing_and_cdpo_mean_what_trl_means():
    """TRL 1.16: label_smoothing is read by robust, exo_pair, aot and aot_unpaired, not sigmoid; exo_pair
    refuses 0.0. cDPO is loss_type cdpo."""
    with pytest.raises(ValueError, match="'label_smoothing' = 0.1 is not used by loss_type 'sigmoid'.*cdpo"):
        build_config(None, {"label_smoothing": "0.1"})
    assert build_config(None, {"loss_type": "cdpo", "label_smoothing": "0.1"}).loss_params() == {"label_smoothing": 0.1}
    assert build_config(None, {}).loss_params() == {}  # sigmoid takes none
    assert build_config(None, {"loss_type": "robust"}).loss_params() == {"label_smoothing": 0.0}
    assert build_config(None, {"loss_type": "discopop"}).loss_params() == {"discopop_tau": 0.05}
    with pytest.raises(ValueError, match="'label_smoothing' = 0.0: loss_type 'exo_pair' needs 0 < label_smoothing"):
        build_config(None, {"loss_type": "exo_pair"})
    assert build_config(None, {"loss_type": "exo_pair", "label_smoothing": "1e-3"}).label_smoothing == 1e-3
    with pytest.raises(ValueError, match="loss_type 'robust' needs 0 <= label_smoothing < 0.5"):
        build_config(None, {"loss_type": "robust", "label_smoothing": "0.5"})


def test_loss_key_defaults_are_the_loss_functions_defaults():
    """A loss key's config default is the default of every loss function that takes it (None: the function's)."""
    import dataclasses
    import inspect

    from logitsam.core.losses import LOSS_TYPES
    from logitsam.train.config import LOSS_PARAMS

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in LOSS_PARAMS:
        takers = [fn for fn in LOSS_TYPES.values() if key in inspect.signature(fn).parameters]
        assert takers, key
        if defaults[key] is not None:
            assert {inspect.signature(fn).parameters[key].default for fn in takers} == {defaults[key]}, key


def _default(f):
    import dataclasses

    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_defaults_equal_trl_dpo_config_except_the_listed_differences():
    """Every DPOConfig key we accept defaults to TRL 1.16's value unless TRL_DIFFERENCES lists it (with why),
    every listed key really differs, and every DPOConfig key we do not accept is refused with a reason."""
    pytest.importorskip("trl")
    import dataclasses

    from transformers import TrainingArguments
    from trl import DPOConfig

    from logitsam.train.config import REMOVED_KEYS, TRAINING_DEFAULTS, TRL_DIFFERENCES

    ours = {f.name: _default(f) for f in dataclasses.fields(TrainConfig)}
    hf = {f.name: _default(f) for f in dataclasses.fields(TrainingArguments)}
    differ = set()
    for f in dataclasses.fields(DPOConfig):
        if not f.init:
            continue
        if f.name in ours:
            mine = ours[f.name]
        elif f.name in hf:
            mine = TRAINING_DEFAULTS.get(f.name, hf[f.name])
        else:
            assert f.name in REMOVED_KEYS, f"DPOConfig key {f.name!r} is neither accepted nor refused with a reason"
            continue
        if mine != _default(f):
            differ.add(f.name)
    assert differ == set(TRL_DIFFERENCES), (
        f"defaults differing from TRL but not listed: {sorted(differ - set(TRL_DIFFERENCES))}; listed but equal: "
        f"{sorted(set(TRL_DIFFERENCES) - differ)} (update TRL_DIFFERENCES and the README table)")


def test_resume_and_strategy_words(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("resume_from_checkpoint: true\nsave_strategy: no\nlogging_steps: 5\n")
    cfg = build_config(recipe)
    assert cfg.training_args == {"resume_from_checkpoint": "last", "save_strategy": "no", "logging_steps": 5}
    assert build_config(recipe, {"resume_from_checkpoint": "false"}).training_args["resume_from_checkpoint"] is None
