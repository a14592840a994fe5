"""Every kind of invalid row: the error names source, row and field; drop mode counts and logs it."""

import json
import logging
from pathlib import Path

import pytest

from logitsam.data import (
    InvalidRowError,
    build_preference_dataset,
    load_preference_examples,
    parse_hh_transcript,
)

FIXTURES = Path(__file__).parent / "fixtures"
GOOD_PCR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
GOOD_HH = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
GOOD_CONV = {"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


# (format, bad record, field, reason, message fragment); the bad record is written as row 2
CASES = [
    ("prompt_chosen_rejected", {"prompt": "p", "rejected": "bad"}, "chosen", "missing_field", "missing"),
    ("prompt_chosen_rejected", {"prompt": None, "chosen": "a", "rejected": "b"}, "prompt", "missing_field",
     "null"),
    ("prompt_chosen_rejected", {"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen", "wrong_type",
     "expected a string, got int"),
    ("prompt_chosen_rejected", {"prompt": "p", "chosen": "a", "rejected": " \n\t"}, "rejected",
     "empty_response", "whitespace-only"),
    ("prompt_chosen_rejected", {"prompt": "p", "chosen": "same", "rejected": "same\n"}, "rejected",
     "identical_responses", "same text"),
    ("hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: b"}, "chosen",
     "unparseable_transcript", "no '\\n\\nAssistant:' turn"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "rejected",
     "unparseable_transcript", "share no prompt"),
    ("hh", {"chosen": "\n\nAssistant: x\n\nAssistant: y", "rejected": "\n\nAssistant: x\n\nAssistant: z"},
     "chosen", "unparseable_transcript", "does not start with a 'Human:' turn"),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": "\n\nHuman: hi\n\nAssistant: b"}, "chosen",
     "empty_response", "whitespace-only"),
    ("conversational", {"chosen": [_user("q"), _bot("a")], "rejected": [_user("q")]}, "rejected",
     "malformed_messages", "last message has role 'user'"),
    ("conversational", {"chosen": [_user("q"), _bot("a")], "rejected": [_user("Q"), _bot("b")]}, "rejected",
     "malformed_messages", "prompt turns differ"),
    ("conversational", {"chosen": [_bot("a")], "rejected": [_bot("b")]}, "prompt", "missing_field",
     "empty message list"),
    ("conversational", {"prompt": "q", "chosen": "a", "rejected": [_bot("b")]}, "chosen", "wrong_type",
     "expected a list of messages, got str"),
    ("conversational", {"prompt": "q", "chosen": [{"role": "tool", "content": "x"}, _bot("a")],
                        "rejected": [_bot("b")]}, "chosen", "malformed_messages", "role 'tool'"),
    ("conversational", {"prompt": "q", "chosen": [{"role": "assistant", "content": None}],
                        "rejected": [_bot("b")]}, "chosen", "wrong_type", "message 0"),
]
GOOD = {"prompt_chosen_rejected": GOOD_PCR, "hh": GOOD_HH, "conversational": GOOD_CONV}


def _write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("data_format, bad, field, reason, fragment", CASES)
def test_invalid_row_error_names_file_row_and_field(tmp_path, data_format, bad, field, reason, fragment):
    good = GOOD[data_format]
    path = _write(tmp_path, [good, good, bad, good])
    with pytest.raises(InvalidRowError) as caught:
        load_preference_examples(path, data_format=data_format)
    error = caught.value
    assert (error.source, error.row, error.field, error.reason) == (str(path), 2, field, reason)
    assert str(error).startswith(f"{path}: row 2, field '{field}': ")
    assert fragment in str(error)
    assert isinstance(error, ValueError)

    examples, report = load_preference_examples(path, data_format=data_format, on_invalid="drop")
    assert [ex["row"] for ex in examples] == [0, 1, 3]
    assert report.counts == {reason: 1} and report.first_rows == {reason: [2]}


def test_invalid_json_line_is_named_by_row_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD_PCR) + "\n\n" + '{"prompt": "p", "chosen": \n' + json.dumps(GOOD_PCR) + "\n")
    with pytest.raises(InvalidRowError, match=r"pairs\.jsonl: row 1: line 3 is not valid JSON"):
        load_preference_examples(path)
    examples, report = load_preference_examples(path, on_invalid="drop")
    assert [ex["row"] for ex in examples] == [0, 2]
    assert (report.rows_read, report.kept, report.counts) == (3, 2, {"invalid_json": 1})


def test_broken_json_array_is_a_file_error(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"},')
    with pytest.raises(ValueError, match=r"pairs\.json: not valid JSON"):
        load_preference_examples(path)


def test_prompt_too_long_is_named_or_counted(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, [GOOD_PCR, {"prompt": "x" * 30, "chosen": "a", "rejected": "b"}, GOOD_PCR])
    with pytest.raises(InvalidRowError, match=r"pairs\.jsonl: row 1, field 'prompt': prompt of 30 tokens fills "
                                              r"max_length=20; truncation_mode=keep_start leaves no completion "
                                              r"token \[prompt_too_long\]"):
        build_preference_dataset(path, tiny_tokenizer, max_length=20, max_prompt_length=None)
    dataset, report = build_preference_dataset(
        path, tiny_tokenizer, max_length=20, max_prompt_length=None, on_invalid="drop"
    )
    assert dataset["row"] == [0, 2] and dataset["index"] == [0, 1]
    assert report.counts == {"prompt_too_long": 1} and report.kept == 2


def test_chat_template_refusal_is_counted(tiny_tokenizer):
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = FIXTURES / "conversational.jsonl"
    with pytest.raises(InvalidRowError, match=r"row 1, field 'prompt': no system role \[chat_template_error\]"):
        build_preference_dataset(path, tiny_tokenizer)
    dataset, report = build_preference_dataset(path, tiny_tokenizer, on_invalid="drop")
    assert dataset["row"] == [0, 2] and report.counts == {"chat_template_error": 1}


def test_drop_mode_counts_every_reason_and_logs(caplog):
    path = FIXTURES / "pcr_invalid.jsonl"
    with pytest.raises(InvalidRowError, match=r"pcr_invalid\.jsonl: row 1, field 'chosen'"):
        load_preference_examples(path)
    with caplog.at_level(logging.DEBUG, logger="logitsam.data"):
        examples, report = load_preference_examples(path, on_invalid="drop")
        report.log_summary()
    assert [ex["row"] for ex in examples] == [0, 6]
    assert report.counts == {
        "missing_field": 2, "wrong_type": 2, "empty_response": 1, "identical_responses": 1, "invalid_json": 1
    }
    assert report.first_rows["missing_field"] == [1, 8] and report.first_rows["wrong_type"] == [2, 7]
    assert (report.rows_read, report.dropped, report.kept) == (9, 7, 2)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 7 and "row 4, field 'rejected'" in debug[3].getMessage()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.name == "logitsam.data"
    assert "kept 2 of 9 rows; dropped 7: empty_response=1 (rows 3); identical_responses=1 (rows 4)" in (
        warning.getMessage()
    )


def test_report_lists_only_the_first_rows():
    from logitsam.data import DropReport

    report = DropReport("src", on_invalid="drop", rows_read=10, max_listed=2)
    for row in (3, 5, 9):
        report.reject(row, "chosen", "empty_response", "empty")
    assert report.first_rows == {"empty_response": [3, 5]}
    assert str(report) == "src: kept 7 of 10 rows; dropped 3: empty_response=3 (rows 3, 5, ...)"


def test_parse_hh_multi_turn():
    prefix = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman:  Tell me a joke. \n\nAssistant:"
    messages, chosen, rejected = parse_hh_transcript(prefix + " Why? Because.", prefix + " No.")
    assert messages == [_user("Hi there"), _bot("Hello!"), _user("Tell me a joke.")]
    assert (chosen, rejected) == ("Why? Because.", "No.")


def test_parse_hh_response_that_continues_the_dialogue():
    """The chosen response writes its own "\\n\\nAssistant:" turn: the prompt is still the shared part."""
    prefix = "\n\nHuman: Are drag queens men?\n\nAssistant:"
    chosen = prefix + " No.\n\nHuman: Why?\n\nAssistant: Because."
    messages, response, _ = parse_hh_transcript(chosen, prefix + " Yes.")
    assert messages == [_user("Are drag queens men?")]
    assert response == "No.\n\nHuman: Why?\n\nAssistant: Because."


def test_parse_hh_shared_response_start_is_not_prompt():
    prefix = "\n\nHuman: Pick one.\n\nAssistant:"
    messages, chosen, rejected = parse_hh_transcript(prefix + " I pick A.", prefix + " I pick B.")
    assert messages == [_user("Pick one.")] and (chosen, rejected) == ("I pick A.", "I pick B.")
