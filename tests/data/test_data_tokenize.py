"""Rendering, labels, EOS, truncation and drops, on the char-level tokenizer (one token per character)."""

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
    "mode, max_prompt_length, max_length, chosen, rejected",
    [
        # TRL's keep_start on the whole sequence: the completion is cut at its tail, EOS first
        ("keep_start", None, 12, "abcdefghij^XY", "abcdefghij^UV"),
        ("keep_start", None, 13, "abcdefghij^XYZ", f"abcdefghij^UV{EOS}"),
        ("keep_start", None, None, f"abcdefghij^XYZ{EOS}", f"abcdefghij^UV{EOS}"),
        # max_prompt_length keeps the prompt's last tokens, whatever the mode
        ("keep_start", 4, 6, "ghij^XY", "ghij^UV"),
        ("keep_end", 4, 6, f"ij^XYZ{EOS}", f"hij^UV{EOS}"),
        # TRL's keep_end keeps each sequence's last max_length tokens, so the two prompts can differ
        ("keep_end", None, 12, f"cdefghij^XYZ{EOS}", f"bcdefghij^UV{EOS}"),
        ("keep_end", None, 3, f"^YZ{EOS}", f"^UV{EOS}"),
    ],
)
def test_truncation_rule(tmp_path, tiny_tokenizer, mode, max_prompt_length, max_length, chosen, rejected):
    """Expected sequences written as ``kept prompt ^ kept completion`` (one token per character)."""
    path = _pcr_file(tmp_path, "abcdefghij", "XYZ", "UV")
    dataset, _ = build_preference_dataset(
        path, tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode
    )
    row = dataset[0]
    assert row["prompt_length"] == min(10, max_prompt_length or 10)
    for side, expected in (("chosen", chosen), ("rejected", rejected)):
        prompt, completion = expected.split("^")
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        p = len(_ids(tiny_tokenizer, prompt))
        assert _text(tiny_tokenizer, ids) == prompt + completion
        assert labels == [-100] * p + ids[p:]
        assert max_length is None or len(ids) <= max_length


def test_truncate_pair_directly():
    prompt, completion = list(range(10)), [100, 101, 102]
    assert truncate_pair(prompt, completion, max_length=6, max_prompt_length=4) == ([6, 7, 8, 9], [100, 101])
    assert truncate_pair(prompt, completion, max_length=6, max_prompt_length=4, truncation_mode="keep_end") == (
        [7, 8, 9], [100, 101, 102]
    )
    assert truncate_pair(prompt, completion, max_length=10) == (prompt, [])
    assert truncate_pair(prompt, completion, max_length=2, truncation_mode="keep_end") == ([], [101, 102])
    assert truncate_pair(prompt, completion, max_length=None, max_prompt_length=None) == (prompt, completion)
    with pytest.raises(ValueError, match="truncation_mode='left'; allowed: keep_start, keep_end"):
        truncate_pair(prompt, completion, max_length=6, max_prompt_length=4, truncation_mode="left")


def test_prompt_that_fills_max_length_is_dropped_only_with_keep_start(tmp_path, tiny_tokenizer):
    """TRL's drop rule: ``len(prompt_ids) < max_length`` with keep_start; keep_end keeps every row."""
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"prompt": "abcd", "chosen": "X", "rejected": "Y"}) + "\n"
                    + json.dumps({"prompt": "abcde", "chosen": "X", "rejected": "Y"}) + "\n")
    kept, report = build_preference_dataset(path, tiny_tokenizer, max_length=5, on_invalid="drop")
    assert kept["row"] == [0] and report.counts == {"prompt_too_long": 1}
    assert _text(tiny_tokenizer, kept[0]["chosen_input_ids"]) == "abcdX"
    kept, report = build_preference_dataset(path, tiny_tokenizer, max_length=5, truncation_mode="keep_end")
    assert kept["row"] == [0, 1] and report.counts == {}
    assert _text(tiny_tokenizer, kept[1]["chosen_input_ids"]) == f"cdeX{EOS}"


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
    assert _text(tiny_tokenizer, row["chosen_input_ids"]) == expected_prompt + "hi" + EOS + "\n"
    assert row["prompt_length"] == len(_ids(tiny_tokenizer, expected_prompt))
    assert _text(tiny_tokenizer, [t for t in row["chosen_labels"] if t != -100]) == "hi" + EOS + "\n"


def test_chat_template_renders_whole_conversations(tiny_tokenizer):
    """TRL: the completion is the template's rendering of the response, its turn end ``<|im_end|>\\n`` included."""
    dataset, _ = build_preference_dataset(FIXTURES / "conversational.jsonl", tiny_tokenizer)
    texts = [_text(tiny_tokenizer, ids) for ids in dataset["chosen_input_ids"]]
    assert texts[0] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4" + EOS + "\n"
    assert texts[1] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello." + EOS + "\n"
    )
    assert texts[2].endswith("<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\nD" + EOS + "\n")
    rejected = _text(tiny_tokenizer, dataset[2]["rejected_input_ids"])
    assert rejected == texts[2][: -len("D" + EOS + "\n")] + "E" + EOS + "\n"
    labels = dataset[0]["chosen_labels"]
    assert _text(tiny_tokenizer, [t for t in labels if t != -100]) == "4" + EOS + "\n"


def test_per_message_rendering_is_the_earlier_one(tiny_tokenizer):
    """``chat_rendering="per_message"``: the prompt rendered alone, the completion the bare response + EOS."""
    dataset, _ = build_preference_dataset(FIXTURES / "conversational.jsonl", tiny_tokenizer,
                                          chat_rendering="per_message")
    texts = [_text(tiny_tokenizer, ids) for ids in dataset["chosen_input_ids"]]
    assert texts[0] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4" + EOS
    assert texts[2].endswith("<|im_start|>assistant\nD" + EOS)
    with pytest.raises(ValueError, match="chat_rendering='legacy'; allowed: trl, per_message"):
        build_preference_dataset(FIXTURES / "conversational.jsonl", tiny_tokenizer, chat_rendering="legacy")


def test_hh_is_raw_text_split_at_the_first_differing_character(tiny_tokenizer):
    """TRL trains on HH's raw text; a response start shared by chosen and rejected belongs to the prompt."""
    path = FIXTURES / "hh.jsonl.gz"
    raw, _ = build_preference_dataset(path, tiny_tokenizer)
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert _text(tiny_tokenizer, raw[0]["chosen_input_ids"]) == prompt + " 4." + EOS
    assert raw[0]["prompt_length"] == len(prompt)
    # row 2: "Blue." against "Bleu, ...": the shared "Bl" is prompt, not completion
    prompt = "\n\nHuman: Name a colour.\n\nAssistant: Bl"
    assert raw[2]["prompt_length"] == len(prompt)
    assert _text(tiny_tokenizer, raw[2]["chosen_input_ids"]) == prompt + "ue." + EOS
    assert _text(tiny_tokenizer, raw[2]["rejected_labels"][len(prompt):]) == "eu, which is French." + EOS
    tiny_tokenizer.chat_template = None  # raw text needs no template
    assert build_preference_dataset(path, tiny_tokenizer)[0]["chosen_input_ids"] == raw["chosen_input_ids"]


def test_hh_through_the_chat_template_when_asked(tiny_tokenizer):
    path = FIXTURES / "hh.jsonl.gz"
    templated, _ = build_preference_dataset(path, tiny_tokenizer, apply_chat_template=True)
    assert _text(tiny_tokenizer, templated[0]["chosen_input_ids"]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4." + EOS + "\n"
    )
    # per_message renders HH through the template by default, as logitsam did before
    old, _ = build_preference_dataset(path, tiny_tokenizer, chat_rendering="per_message")
    assert _text(tiny_tokenizer, old[0]["chosen_input_ids"]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4." + EOS
    )
    old_raw, _ = build_preference_dataset(path, tiny_tokenizer, chat_rendering="per_message",
                                          apply_chat_template=False)
    transcript = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert _text(tiny_tokenizer, old_raw[1]["rejected_input_ids"]) == transcript + " No." + EOS
    assert old_raw[1]["prompt_length"] == len(transcript)
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="apply_chat_template=True but the tokenizer has no chat_template"):
        build_preference_dataset(path, tiny_tokenizer, apply_chat_template=True)


def test_message_prompts_without_a_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    path = FIXTURES / "conversational.jsonl"
    with pytest.raises(ValueError, match="row 0: a message-list prompt needs a chat template.*apply_chat_template"):
        build_preference_dataset(path, tiny_tokenizer)
    as_text, _ = build_preference_dataset(path, tiny_tokenizer, apply_chat_template=False)
    assert _text(tiny_tokenizer, as_text[0]["chosen_input_ids"]) == "\n\nHuman: What is 2+2?\n\nAssistant: 4" + EOS
    fallback, _ = build_preference_dataset(path, tiny_tokenizer, chat_rendering="per_message")
    assert fallback["chosen_input_ids"] == as_text["chosen_input_ids"]


def test_tokenize_examples_columns(tiny_tokenizer):
    examples = [{"prompt": "ab", "chosen": "c", "rejected": "de", "row": 7}]
    columns = tokenize_examples(examples, tiny_tokenizer, max_length=None)
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
