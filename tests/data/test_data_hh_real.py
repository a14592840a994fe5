"""The real Anthropic HH-RLHF harmless-base test pairs (skipped when ../shared/data is absent)."""

from functools import cache

import pytest

from logitsam.data import InvalidRowError, build_preference_dataset, load_preference_examples

EMPTY_CHOSEN_ROWS = [86, 516, 925, 1103]  # the chosen response is " " in each


@cache
def _examples(path):
    return load_preference_examples(path, on_invalid="drop")


@cache
def _built(path):
    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    # The first 400 rows keep this test fast; `load_preference_examples` above covers all 2,312.
    dataset, report = build_preference_dataset(
        path, tokenizer, split="train[:400]", max_length=512, max_prompt_length=256, on_invalid="drop"
    )
    return tokenizer, dataset, report


def test_all_rows_parse_except_four_empty_responses(hh_path):
    examples, report = _examples(hh_path)
    assert report.rows_read == 2312
    assert report.counts == {"empty_response": len(EMPTY_CHOSEN_ROWS)}
    assert report.first_rows == {"empty_response": EMPTY_CHOSEN_ROWS[:5]}
    assert len(examples) == 2308
    with pytest.raises(InvalidRowError) as caught:
        load_preference_examples(hh_path)
    assert (caught.value.row, caught.value.field, caught.value.reason) == (86, "chosen", "empty_response")


def test_known_row_prompt_and_responses(hh_path):
    examples, _ = _examples(hh_path)
    row0 = examples[0]
    assert row0["row"] == 0
    assert [m["role"] for m in row0["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert row0["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert row0["prompt"][2]["content"] == "yep"
    assert row0["prompt"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert row0["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert row0["rejected"].startswith("There are lots of funny things you can do with pens")
    # row 1254: the chosen response writes a "\n\nAssistant:" turn of its own; the prompt stops before it
    (row1254,) = [ex for ex in examples if ex["row"] == 1254]
    assert row1254["prompt"][-1] == {"role": "user", "content": "Isn't that drag kings?"}
    assert row1254["chosen"].startswith("No. Men who impersonate stereotypical women")
    assert "\n\nAssistant:" in row1254["chosen"]
    assert row1254["rejected"].startswith("A drag king is the opposite of a drag queen")


def test_tokenised_with_the_tiny_tokenizer(hh_path):
    tokenizer, dataset, report = _built(hh_path)
    assert report.rows_read == 400 and report.counts == {"empty_response": 1}  # row 86
    assert len(dataset) == 399 and list(dataset["index"]) == list(range(399))
    assert 86 not in dataset["row"] and dataset["row"][86] == 87
    prompt_lengths = list(dataset["prompt_length"])
    assert max(prompt_lengths) == 256  # some prompts were cut
    for side in ("chosen", "rejected"):
        ids, labels = dataset[f"{side}_input_ids"], dataset[f"{side}_labels"]
        for p, row_ids, row_labels in zip(prompt_lengths, ids, labels, strict=True):
            assert len(row_ids) == len(row_labels) <= 512
            assert row_labels[:p] == [-100] * p and row_labels[p:] == row_ids[p:] and len(row_ids) > p
    row0 = dataset[0]
    p = row0["prompt_length"]
    prompt = tokenizer.decode(row0["chosen_input_ids"][:p], skip_special_tokens=False)
    completion = tokenizer.decode(row0["chosen_input_ids"][p:], skip_special_tokens=False)
    # the default trains on HH's raw text, as TRL does; max_prompt_length kept the prompt's last 256 characters
    assert p == 256
    assert prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert completion == (" No, sorry!  All of these involve a pen, the point is that you can get funny results "
                          "by doing pranks with pens.<|im_end|>")
