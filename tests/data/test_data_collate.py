"""Collator layout and padding; train/eval split determinism."""

from pathlib import Path

import pytest
import torch

from logitsam.data import PreferenceCollator, build_preference_dataset, train_eval_split

FIXTURES = Path(__file__).parent / "fixtures"
PAD = 0


def _features():
    return [
        {"index": 4, "chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
         "rejected_input_ids": [1, 5], "rejected_labels": [-100, 5], "ref_chosen_logps": -1.5,
         "ref_rejected_logps": -2.5},
        {"index": 9, "chosen_input_ids": [7, 8, 9, 10, 11], "chosen_labels": [-100, -100, 9, 10, 11],
         "rejected_input_ids": [7, 8, 12], "rejected_labels": [-100, -100, 12], "ref_chosen_logps": -0.25,
         "ref_rejected_logps": -4.0},
    ]


def test_layout_chosen_rows_first_right_padded():
    batch = PreferenceCollator(pad_token_id=PAD)(_features())
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, PAD, PAD],
        [7, 8, 9, 10, 11],
        [1, 5, PAD, PAD, PAD],
        [7, 8, 12, PAD, PAD],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, 2, 3, -100, -100],
        [-100, -100, 9, 10, 11],
        [-100, 5, -100, -100, -100],
        [-100, -100, 12, -100, -100],
    ]
    assert batch["index"].tolist() == [4, 9] and batch["index"].dtype == torch.long
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.25]
    assert batch["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "labels"))


def test_pad_to_multiple_and_optional_columns():
    features = [{k: v for k, v in f.items() if k.endswith(("ids", "labels"))} for f in _features()]
    batch = PreferenceCollator(pad_token_id=99, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][0, 3:].tolist() == [99] * 5
    assert set(batch) == {"input_ids", "attention_mask", "labels", "completion_index"}


def test_completion_index_is_the_shifted_labels_positions():
    """The collator's host-side index equals the head's own selection of the shifted labels."""
    from logitsam.core.head import completion_index, shift_labels

    batch = PreferenceCollator(pad_token_id=99, pad_to_multiple_of=4)(_features())
    expected = completion_index(shift_labels(batch["labels"]))
    assert expected.numel() > 0 and torch.equal(batch["completion_index"], expected)
    T = batch["labels"].shape[1]
    # written out: position t of row r predicts labels[r, t + 1]
    by_hand = [r * T + t for r in range(batch["labels"].shape[0]) for t in range(T - 1)
               if batch["labels"][r, t + 1] != -100]
    assert batch["completion_index"].tolist() == by_hand


def test_collates_a_built_dataset_through_a_dataloader(tiny_tokenizer):
    dataset, _ = build_preference_dataset(FIXTURES / "pcr.jsonl", tiny_tokenizer)
    collate = PreferenceCollator(pad_token_id=tiny_tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    B = 3
    assert batch["input_ids"].shape[0] == 2 * B
    assert batch["index"].tolist() == [0, 1, 2]
    for i in range(B):
        for row, side in ((i, "chosen"), (i + B, "rejected")):
            ids = dataset[i][f"{side}_input_ids"]
            assert batch["input_ids"][row, : len(ids)].tolist() == ids
            assert batch["attention_mask"][row].sum().item() == len(ids)
            assert (batch["labels"][row, len(ids):] == -100).all()
    # completion tokens are exactly where labels are set
    assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()


def _indexed(n):
    from datasets import Dataset

    return Dataset.from_dict({"index": list(range(n))})


def test_split_is_deterministic_disjoint_and_sized():
    dataset = _indexed(50)
    train, eval_ = train_eval_split(dataset, eval_size=0.1, seed=3)
    again_train, again_eval = train_eval_split(dataset, eval_size=0.1, seed=3)
    assert (train["index"], eval_["index"]) == (again_train["index"], again_eval["index"])
    assert len(eval_) == 5 and len(train) == 45
    assert sorted(list(train["index"]) + list(eval_["index"])) == list(range(50))
    assert list(eval_["index"]) == sorted(eval_["index"])  # each part keeps dataset order
    _, other = train_eval_split(dataset, eval_size=0.1, seed=4)
    assert list(other["index"]) != list(eval_["index"])
    _, by_count = train_eval_split(dataset, eval_size=7, seed=3)
    assert len(by_count) == 7
    _, rounded_up = train_eval_split(_indexed(10), eval_size=0.01)
    assert len(rounded_up) == 1


@pytest.mark.parametrize("eval_size, error", [(0, ValueError), (50, ValueError), (1.0, ValueError),
                                              (0.0, ValueError), ("5", TypeError), (True, TypeError)])
def test_split_rejects_bad_sizes(eval_size, error):
    with pytest.raises(error, match="eval_size="):
        train_eval_split(_indexed(50), eval_size=eval_size)
