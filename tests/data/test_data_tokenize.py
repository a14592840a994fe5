"""Rendering, labels, EOS and the truncation rule, on the char-level tokenizer (one token per character)."""

import json
from pathlib import Path

import pytest

from logitsam.data import build_preference_dataset, tokenize_examples, truncate_pair

FIXTURES = Path(__file__).parent / "fixtures"
EOS = "<|im_end|>"


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def _pcr_file(tmp_path, prompt, chosen, rejected):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.mark.parametrize(
    "mode, max_prompt_length, max_length, prompt, chosen, rejected",
    [
        # prompt cut to 4 tokens from its end / start; completions (EOS included) cut to the 2 left
        ("keep_end", 4, 6, "ghij", "XY", "UV"),
        ("keep_start", 4, 6, "abcd", "XY", "UV"),
        # a 10-token prompt fits; completions keep their EOS when there is room
        ("keep_end", 10, 14, "abcdefghij", f"XYZ{EOS}", f"UV{EOS}"),
        ("keep_start", 12, 13, "abcdefghij", "XYZ", f"UV{EOS}"),
        # no prompt limit: only max_length, which cuts the completion
        ("keep_end", None, 12, "abcdefghij", "XY", "UV"),
        # no limits at all
        ("keep_start", None, None, "abcdefghij", f"XYZ{EOS}", f"UV{EOS}"),
    ],
)
def test_truncation_rule(tmp_path, tiny_tokenizer, mode, max_prompt_length, max_length, prompt, chosen, rejected):
    path = _pcr_file(tmp_path, "abcdefghij", "XYZ", "UV")
    dataset, _ = build_preference_dataset(
        path, tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode
    )
    row = dataset[0]
    assert row["prompt_length"] == len(prompt)
    assert _text(tiny_tokenizer, row["chosen_input_ids"]) == prompt + chosen
    assert _text(tiny_tokenizer, row["rejected_input_ids"]) == prompt + rejected
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert labels == [-100] * len(prompt) + ids[len(prompt):]
        assert max_length is None or len(ids) <= max_length


def test_truncate_pair_directly():
    prompt, completion = list(range(10)), [100, 101, 102]
    assert truncate_pair(prompt, completion, max_length=6, max_prompt_length=4, truncation_mode="keep_end") == (
        [6, 7, 8, 9], [100, 101]
    )
    assert truncate_pair(prompt, completion, max_length=6, max_prompt_length=4, truncation_mode="keep_start") == (
        [0, 1, 2, 3], [100, 101]
    )
    assert truncate_pair(prompt, completion, max_length=10, max_prompt_length=None) == (prompt, [])
    with pytest.raises(ValueError, match="truncation_mode='left'; allowed: keep_end, keep_start"):
        truncate_pair(prompt, completion, max_length=6, max_prompt_length=4, truncation_mode="left")


def test_length_settings_are_checked(tiny_tokenizer):
    path = FIXTURES / "pcr.jsonl"
    with pytest.raises(ValueError, match="max_prompt_length=8 must be < max_length=8"):
        build_preference_dataset(path, tiny_tokenizer, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length=0; must be a positive integer"):
        build_preference_dataset(path, tiny_tokenizer, max_length=0, max_prompt_length=None)
    with pytest.raises(ValueError, match="truncation_mode='keep_middle'"):
        build_preference_dataset(path, tiny_tokenizer, truncation_mode="keep_middle")


def test_eos_is_optional_and_not_doubled(tmp_path, tiny_tokenizer):
    path = _pcr_file(tmp_path, "Q:", " yes" + EOS, " no")
    with_eos, _ = build_preference_dataset(path, tiny_tokenizer)
    assert _text(tiny_tokenizer, with_eos[0]["chosen_input_ids"]) == "Q: yes" + EOS
    assert _text(tiny_tokenizer, with_eos[0]["rejected_input_ids"]) == "Q: no" + EOS
    without, _ = build_preference_dataset(path, tiny_tokenizer, add_eos=False)
    assert _text(tiny_tokenizer, without[0]["rejected_input_ids"]) == "Q: no"


def test_raw_string_prompt_is_rendered_as_is(tiny_tokenizer):
    dataset, _ = build_preference_dataset(FIXTURES / "pcr.jsonl", tiny_tokenizer)
    assert _text(tiny_tokenizer, dataset[0]["chosen_input_ids"]) == "Q: capital of France?\nA: Paris." + EOS
    assert dataset[0]["prompt_length"] == len("Q: capital of France?\nA:")


def test_string_prompt_with_chat_template_when_asked(tiny_tokenizer):
    dataset, _ = build_preference_dataset(FIXTURES / "pcr.json.gz", tiny_tokenizer, apply_chat_template=True)
    expected_prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    row = dataset[0]
    assert _text(tiny_tokenizer, row["chosen_input_ids"]) == expected_prompt + "hi" + EOS
    assert row["prompt_length"] == len(_ids(tiny_tokenizer, expected_prompt))
    assert _text(tiny_tokenizer, [t for t in row["chosen_labels"] if t != -100]) == "hi" + EOS


def test_chat_template_renders_message_prompts(tiny_tokenizer):
    dataset, _ = build_preference_dataset(FIXTURES / "conversational.jsonl", tiny_tokenizer)
    texts = [_text(tiny_tokenizer, ids) for ids in dataset["chosen_input_ids"]]
    assert texts[0] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4" + EOS
    assert texts[1] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello." + EOS
    )
    assert texts[2].endswith("<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\nD" + EOS)
    rejected = _text(tiny_tokenizer, dataset[2]["rejected_input_ids"])
    assert rejected == texts[2][: -len("D" + EOS)] + "E" + EOS


def test_hh_rendering_with_and_without_chat_template(tiny_tokenizer):
    path = FIXTURES / "hh.jsonl.gz"
    templated, _ = build_preference_dataset(path, tiny_tokenizer)
    assert _text(tiny_tokenizer, templated[0]["chosen_input_ids"]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4." + EOS
    )
    raw, _ = build_preference_dataset(path, tiny_tokenizer, apply_chat_template=False)
    transcript = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert _text(tiny_tokenizer, raw[1]["rejected_input_ids"]) == transcript + " No." + EOS
    assert raw[1]["prompt_length"] == len(transcript)
    tiny_tokenizer.chat_template = None  # no template: the same raw transcript
    no_template, _ = build_preference_dataset(path, tiny_tokenizer)
    assert no_template["rejected_input_ids"] == raw["rejected_input_ids"]
    with pytest.raises(ValueError, match="apply_chat_template=True but the tokenizer has no chat_template"):
        build_preference_dataset(path, tiny_tokenizer, apply_chat_template=True)


def test_tokenize_examples_columns(tiny_tokenizer):
    examples = [{"prompt": "ab", "chosen": "c", "rejected": "de", "row": 7}]
    columns = tokenize_examples(examples, tiny_tokenizer, max_length=None, max_prompt_length=None)
    a, b, c, d, e = _ids(tiny_tokenizer, "abcde")
    eos = tiny_tokenizer.eos_token_id
    assert columns == {
        "row": [7],
        "prompt_length": [2],
        "chosen_input_ids": [[a, b, c, eos]],
        "chosen_labels": [[-100, -100, c, eos]],
        "rejected_input_ids": [[a, b, d, e, eos]],
        "rejected_labels": [[-100, -100, d, e, eos]],
    }
