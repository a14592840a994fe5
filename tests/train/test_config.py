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
