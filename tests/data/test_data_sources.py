"""Reading each file type, splits and `max_samples`, and format detection."""

from pathlib import Path

import pytest

from logitsam.data import DropReport, detect_format, load_preference_examples, load_rows

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "name, n_rows, data_format",
    [
        ("hh.jsonl.gz", 3, "hh"),
        ("pcr.jsonl", 4, "prompt_chosen_rejected"),  # its trailing blank line is not a row
        ("pcr.json", 3, "prompt_chosen_rejected"),
        ("pcr.json.gz", 2, "prompt_chosen_rejected"),
        ("conversational.jsonl", 3, "conversational"),
        ("conversational.parquet", 2, "conversational"),
    ],
)
def test_each_file_type_loads_and_is_detected(name, n_rows, data_format):
    report = DropReport(name)
    rows = load_rows(FIXTURES / name, report=report)
    assert [row for row, _ in rows] == list(range(n_rows))
    assert report.rows_read == n_rows
    assert detect_format([record for _, record in rows]) == data_format


def test_parquet_keeps_only_the_preference_columns():
    rows = load_rows(FIXTURES / "conversational.parquet", report=DropReport("uf"))
    assert set(rows[0][1]) == {"prompt", "chosen", "rejected"}  # not messages/score_chosen/...


def test_pcr_examples_are_verbatim():
    examples, report = load_preference_examples(FIXTURES / "pcr.json.gz")
    assert examples[0] == {"prompt": "Say hi.", "chosen": "hi", "rejected": "bye", "row": 0}
    assert report.dropped == 0 and report.kept == 2


def test_conversational_prompts_from_each_layout():
    examples, _ = load_preference_examples(FIXTURES / "conversational.jsonl")
    # prompt turns inside chosen/rejected (UltraFeedback-binarized)
    assert examples[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert (examples[0]["chosen"], examples[0]["rejected"]) == ("4", "5")
    # prompt column of messages, chosen/rejected only the reply
    assert [m["role"] for m in examples[1]["prompt"]] == ["system", "user"]
    assert examples[1]["chosen"] == "Hello."
    # no prompt column: the shared earlier turns
    assert [m["content"] for m in examples[2]["prompt"]] == ["A", "B", "C"]
    assert (examples[2]["chosen"], examples[2]["rejected"]) == ("D", "E")
    parquet, _ = load_preference_examples(FIXTURES / "conversational.parquet")
    assert parquet[1]["prompt"] == [{"role": "user", "content": "Name a fruit."}]
    assert (parquet[1]["chosen"], parquet[1]["rejected"]) == ("Apple", "Carrot")


@pytest.mark.parametrize(
    "split, max_samples, rows",
    [
        ("train", None, [0, 1, 2, 3]),
        ("train[1:3]", None, [1, 2]),
        ("train[-1:]", None, [3]),
        ("train[50%:]", None, [2, 3]),
        ("train[1:]", 2, [1, 2]),
        ("train", 1, [0]),
    ],
)
def test_split_slices_keep_source_row_numbers(split, max_samples, rows):
    examples, report = load_preference_examples(FIXTURES / "pcr.jsonl", split=split, max_samples=max_samples)
    assert [ex["row"] for ex in examples] == rows
    assert report.rows_read == len(rows)


def test_parquet_split_slice():
    examples, _ = load_preference_examples(FIXTURES / "conversational.parquet", split="train[1:]")
    assert [ex["row"] for ex in examples] == [1]


def test_saved_dataset_dict_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    records = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records[:3])}).save_to_disk(
        tmp_path / "pairs"
    )
    examples, _ = load_preference_examples(tmp_path / "pairs", split="test[1:]")
    assert [(ex["row"], ex["prompt"]) for ex in examples] == [(1, "p1"), (2, "p2")]
    with pytest.raises(ValueError, match="no split 'validation'; available: train, test"):
        load_preference_examples(tmp_path / "pairs", split="validation")


def test_bad_sources_and_arguments_are_named(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"pairs\.csv: unsupported file type; allowed: \.jsonl"):
        load_preference_examples(csv)
    with pytest.raises(ValueError, match=r"pcr\.jsonl: split 'test': a local file holds only the 'train'"):
        load_preference_examples(FIXTURES / "pcr.jsonl", split="test")
    with pytest.raises(ValueError, match="split='train\\+test'"):
        load_preference_examples(FIXTURES / "pcr.jsonl", split="train+test")
    with pytest.raises(ValueError, match="max_samples=0"):
        load_preference_examples(FIXTURES / "pcr.jsonl", max_samples=0)
    with pytest.raises(ValueError, match="data_format='csv'; allowed: auto, hh, prompt_chosen_rejected"):
        load_preference_examples(FIXTURES / "pcr.jsonl", data_format="csv")
    with pytest.raises(ValueError, match="on_invalid='skip'; allowed: error, drop"):
        load_preference_examples(FIXTURES / "pcr.jsonl", on_invalid="skip")


def test_detection_names_missing_columns(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"sft\.jsonl: cannot detect .* no chosen or rejected column "
                                         r"\(columns: completion, prompt\)"):
        load_preference_examples(path)


def test_forced_format_overrides_detection():
    # pcr rows read as HH transcripts: no "\n\nAssistant:" anywhere, so every row is unparseable
    examples, report = load_preference_examples(FIXTURES / "pcr.jsonl", data_format="hh", on_invalid="drop")
    assert examples == [] and report.counts == {"unparseable_transcript": 4}
