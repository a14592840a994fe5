"""CHES on hand-worked numbers and against the paper's prompt-index formulation; token edit distance."""

import math
import random

import pytest
import torch
from conftest import make_tiny_llama

from logitsam.diagnostics import ches_scores, edit_distance, normalized_edit_distance
from logitsam.models import forward_hidden

X = 9.0  # hidden states at ignored positions: must not count


def test_ches_hand_worked():
    """Two pairs, d = 2. Rows: chosen 0, chosen 1, rejected 0, rejected 1.

    Pair 0: chosen positions [1, 0], [0, 2]   -> S+ = [1, 2], |y+| = 2
            rejected position [4, 1]          -> S- = [4, 1], |y-| = 1
            <S+, S-> = 4 + 2 = 6, ||S+||^2 = 5
            CHES = 6 - 5 = 1;  CHES_norm = 6 / (2 * 1) - 5 / 2^2 = 3 - 1.25 = 1.75
    Pair 1: chosen position [2, 0]            -> S+ = [2, 0], |y+| = 1
            rejected positions [1, 1], [1, -1] -> S- = [2, 0], |y-| = 2
            <S+, S-> = 4, ||S+||^2 = 4
            CHES = 0;  CHES_norm = 4 / (1 * 2) - 4 / 1 = -2
    """
    hidden = torch.tensor([
        [[X, X], [1, 0], [0, 2], [X, X]],
        [[X, X], [2, 0], [X, X], [X, X]],
        [[X, X], [4, 1], [X, X], [X, X]],
        [[1, 1], [X, X], [1, -1], [X, X]],
    ])
    labels = torch.tensor([
        [-100, 5, 7, -100],
        [-100, 3, -100, -100],
        [-100, 8, -100, -100],
        [4, -100, 6, -100],
    ])
    ches, ches_norm = ches_scores(hidden, labels)
    torch.testing.assert_close(ches, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(ches_norm, torch.tensor([1.75, -2.0]))
    # swapping the roles of chosen and rejected changes the score: CHES is not symmetric
    swapped, _ = ches_scores(hidden[[2, 3, 0, 1]], labels[[2, 3, 0, 1]])
    torch.testing.assert_close(swapped, torch.tensor([6 - 17.0, 4 - 4.0]))


def test_ches_matches_prompt_index_definition():
    """The paper's indexing on unpadded sequences: S sums hidden states at positions
    last_prompt_token .. second-to-last token (len(prompt) - 1 .. len(seq) - 2)."""
    model = make_tiny_llama(vocab_size=64, seed=2)
    g = torch.Generator().manual_seed(0)
    prompt_len, chosen_len, rejected_len = 5, 6, 3
    chosen = torch.randint(4, 64, (1, prompt_len + chosen_len), generator=g)
    rejected = torch.cat([chosen[:, :prompt_len], torch.randint(4, 64, (1, rejected_len), generator=g)], 1)
    with torch.no_grad():
        h_pos = forward_hidden(model, chosen, torch.ones_like(chosen))[0]
        h_neg = forward_hidden(model, rejected, torch.ones_like(rejected))[0]
    s_pos = h_pos[prompt_len - 1 : -1].double().sum(0)
    s_neg = h_neg[prompt_len - 1 : -1].double().sum(0)
    expected = (s_pos @ s_neg - s_pos @ s_pos).item()
    expected_norm = (s_pos @ s_neg / (chosen_len * rejected_len) - s_pos @ s_pos / chosen_len**2).item()

    # our layout: right-padded (2, T) batch with shifted labels, -100 at the prompt and padding
    T = prompt_len + chosen_len
    hidden = torch.zeros(2, T, h_pos.shape[-1])
    hidden[0], hidden[1, : rejected.shape[1]] = h_pos, h_neg
    hidden[1, rejected.shape[1] :] = 100.0  # padding garbage
    labels = torch.full((2, T), -100)
    labels[0, prompt_len - 1 : -1] = chosen[0, prompt_len:]
    labels[1, prompt_len - 1 : rejected.shape[1] - 1] = rejected[0, prompt_len:]
    ches, ches_norm = ches_scores(hidden, labels)
    assert ches.item() == pytest.approx(expected, rel=1e-4)
    assert ches_norm.item() == pytest.approx(expected_norm, rel=1e-4)


def test_ches_empty_row_and_bad_shapes():
    hidden = torch.ones(2, 3, 2)
    labels = torch.tensor([[-100, 1, 2], [-100, -100, -100]])
    ches, ches_norm = ches_scores(hidden, labels)
    assert ches.item() == pytest.approx(0 - 8.0)  # S+ = [2, 2], S- = 0
    assert math.isnan(ches_norm.item())
    with pytest.raises(ValueError, match="expected hidden"):
        ches_scores(torch.ones(3, 3, 2), torch.zeros(3, 3, dtype=torch.long))


def dp_edit_distance(a, b):
    """The textbook O(nm) table, the reference for the bit-parallel version."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("abc", "cba", 2),
        ("intention", "execution", 5),
    ],
)
def test_edit_distance_known_cases(a, b, distance):
    a_ids, b_ids = [ord(c) for c in a], [ord(c) for c in b]
    assert edit_distance(a_ids, b_ids) == distance
    assert edit_distance(b_ids, a_ids) == distance
    longest = max(len(a), len(b))
    assert normalized_edit_distance(a_ids, b_ids) == (distance / longest if longest else 0.0)


def test_edit_distance_matches_dp_on_random_token_ids():
    rng = random.Random(0)
    for _ in range(300):
        vocab = rng.choice([2, 5, 50000])
        a = [rng.randrange(vocab) for _ in range(rng.randrange(0, 90))]  # crosses the 64-bit word size
        b = [rng.randrange(vocab) for _ in range(rng.randrange(0, 90))]
        assert edit_distance(a, b) == dp_edit_distance(a, b), (a, b)
    long_a = [rng.randrange(30) for _ in range(500)]
    long_b = long_a[:200] + [rng.randrange(30) for _ in range(100)] + long_a[250:]
    assert normalized_edit_distance(long_a, long_b) == dp_edit_distance(long_a, long_b) / 550


def test_diagnostics_import_no_hugging_face():
    """diagnostics -> core -> torch only: importing it must not pull in transformers."""
    import subprocess
    import sys

    code = "import sys, logitsam.diagnostics; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
