"""LogitsSAMConfig validation, the DPOConfig -> preference_loss mapping, and the refused DPOConfig features."""

import inspect

import pytest

pytest.importorskip("trl")

from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOConfig  # noqa: E402

from logitsam.core.losses import LOSS_TYPES  # noqa: E402
from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer, preference_loss_kwargs  # noqa: E402


def cfg(tmp_path, cls=LogitsSAMConfig, **kw):
    return cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


@pytest.mark.parametrize(("key", "value"), [("sam_rho", -1e-4), ("sam_rho", float("nan")), ("sam_norm", "per-rank"),
                                            ("sam_variant", "asma"), ("sam_chunk_size", 0),
                                            ("sam_vocab_chunk_size", None)])
def test_bad_sam_keys_name_key_and_value(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"'{key}' = {value!r}"):
        cfg(tmp_path, **{key: value})


def test_mapping_gives_each_loss_the_keys_trl_reads(tmp_path):
    kw = preference_loss_kwargs(cfg(tmp_path, loss_type="sigmoid", label_smoothing=0.2, beta=0.3))
    assert kw == {"loss_type": ["sigmoid"], "beta": 0.3, "loss_weights": [1.0]}  # TRL 1.16 ignores it for sigmoid
    kw = preference_loss_kwargs(cfg(tmp_path, loss_type=["robust", "discopop"], loss_weights=[0.5, 2.0],
                                    label_smoothing=0.2, discopop_tau=0.3))
    assert kw == {"loss_type": ["robust", "discopop"], "beta": 0.1, "loss_weights": [0.5, 2.0],
                  "label_smoothing": 0.2, "discopop_tau": 0.3}
    with pytest.raises(ValueError, match=r"'loss_type' = \['simpo'\] is not a TRL 1.16 DPO loss"):
        preference_loss_kwargs(cfg(tmp_path, loss_type="simpo"))


def test_mapping_refuses_a_key_our_loss_would_read_differently(tmp_path):
    args = cfg(tmp_path, loss_type=["sigmoid", "robust"], label_smoothing=0.1)
    if "label_smoothing" in inspect.signature(LOSS_TYPES["sigmoid"]).parameters:  # our sigmoid smooths (cDPO)
        with pytest.raises(ValueError, match=r"TRL 1.16 ignores it for \['sigmoid'\]"):
            preference_loss_kwargs(args)
    else:
        assert preference_loss_kwargs(args)["label_smoothing"] == 0.1


def trainer(tmp_path, args):
    tok = make_tiny_tokenizer()
    data = Dataset.from_list([{"prompt": "Hi:", "chosen": " yes", "rejected": " no"}] * 2)
    return LogitsSAMDPOTrainer(model=make_tiny_llama(vocab_size=len(tok)), ref_model=make_tiny_llama(len(tok)),
                               args=args, train_dataset=data, processing_class=tok)


@pytest.mark.parametrize(("key", "value"), [("f_divergence_type", "js_divergence"), ("use_weighting", True),
                                            ("ld_alpha", 0.5)])
def test_trl_loss_options_are_accepted(tmp_path, key, value):
    t = trainer(tmp_path, cfg(tmp_path, **{key: value}))
    assert getattr(t.args, key) == value
    if key == "f_divergence_type":
        assert t._loss_kwargs["f_divergence_type"] == value


def test_f_divergence_with_a_loss_trl_refuses_it_for(tmp_path):
    with pytest.raises(ValueError, match="f_divergence_type"):
        trainer(tmp_path, cfg(tmp_path, f_divergence_type="forward_kl", loss_type="bco_pair"))


def test_plain_dpo_config_is_refused(tmp_path):
    with pytest.raises(TypeError, match="LogitsSAMConfig"):
        trainer(tmp_path, cfg(tmp_path, cls=DPOConfig))


def test_help_on_every_sam_key():
    fields = LogitsSAMConfig.__dataclass_fields__
    for name in ("sam_rho", "sam_norm", "sam_variant", "sam_chunk_size", "sam_vocab_chunk_size"):
        assert fields[name].metadata["help"], name


def test_parses_from_the_command_line_like_any_trl_config():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(LogitsSAMConfig).parse_args_into_dataclasses(
        ["--output_dir", "out", "--report_to", "none", "--use_cpu", "--sam_rho", "1e-3", "--sam_chunk_size", "64",
         "--sam_variant", "asam", "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5"])
    assert (args.sam_rho, args.sam_chunk_size, args.sam_variant) == (1e-3, 64, "asam")
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]


@pytest.mark.parametrize("key", ["use_liger_kernel", "padding_free"])
def test_keys_the_head_cannot_honour_are_refused(tmp_path, key):
    """Liger patches the logits path our head replaces; our head step needs padded rows. Both used to be accepted and
    silently not honoured."""
    from logitsam.train.config import ConfigError

    with pytest.raises(ConfigError, match=rf"'{key}' = True is not supported by LogitsSAMDPOTrainer: .+; set {key}="):
        cfg(tmp_path, **{key: True})
    args = cfg(tmp_path)
    setattr(args, key, True)  # set after the config was built: refused by the trainer, before TRL reads it
    with pytest.raises(ValueError, match=rf"'{key}' = True is not supported"):
        trainer(tmp_path, args)
