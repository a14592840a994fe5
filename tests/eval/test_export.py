"""`logitsam eval --export`: answer files the official AlpacaEval, MT-Bench and Arena-Hard tools read as they are.

Each format test reads the file back the way its tool does (the lines quoted in ``logitsam.eval.export``) and
checks the exact set of fields. Mistakes in a question file end in one line naming the file, row and field,
before any model is loaded (the model path in those cases does not exist).
"""

import json

import pytest
from conftest import make_tiny_llama, make_tiny_tokenizer

from logitsam.cli import build_parser, main
from logitsam.data import DataError
from logitsam.eval.export import BENCHMARKS, answer_conversations, questions_from_prompts, read_questions
from logitsam.eval.generate import generate_responses

MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem.", "Now make it rhyme."]},
    {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And times 3?"]},
    {"question_id": 83, "category": "stem", "turns": ["Name a gas."]},  # a one-turn question works too
]
ARENA_HARD = [
    {"uid": "328c149ed45a41c0", "category": "arena-hard-v0.1", "cluster": "ABC", "prompt": "Write a folk tune."},
    {"uid": "b43c07656ead4150", "category": "hard_prompt", "subcategory": "coding", "prompt": "Sort a list in C."},
]
ALPACA_EVAL = [  # rows of alpaca_eval.json carry the reference's output and generator, and a dataset; all ignored
    {"dataset": "helpful_base", "instruction": "What are the names of some famous actors?", "output": "ref",
     "generator": "gpt4_1106_preview"},
    {"dataset": "koala", "instruction": "Tell me a joke.", "output": "ref", "generator": "gpt4_1106_preview"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _export(tiny_model_dir, pairs_file, out, *flags):
    """`logitsam eval --export ...` on the tiny model against itself: greedy, 4 new tokens, no judged win rate."""
    main(["eval", "--model", str(tiny_model_dir), "--ref_model", str(tiny_model_dir), "--dataset_name",
          str(pairs_file), "--split", "train",
          "--max_samples", "4", "--max_length", "64", "--num_prompts", "0", "--max_new_tokens", "4",
          "--temperature", "0", "--gen_batch_size", "2", "--output_dir", str(out), *map(str, flags)])
    return json.loads((out / "eval_results.json").read_text())


def test_alpaca_eval_file_is_a_list_of_instruction_output_generator(tiny_model_dir, pairs_file, tmp_path):
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps(ALPACA_EVAL))
    results = _export(tiny_model_dir, pairs_file, tmp_path / "eval", "--export", "alpaca_eval",
                      "--export_questions", questions)
    path = tmp_path / "eval" / "export" / "alpaca_eval" / "model_outputs.json"
    assert results["export"]["file"] == str(path)
    rows = json.loads(path.read_text())
    assert [set(r) for r in rows] == [{"instruction", "output", "generator"}] * 2
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in ALPACA_EVAL]
    # alpaca_eval's get_generator_name: one unique generator names the model (default: the model dir's name)
    assert {r["generator"] for r in rows} == {"tiny-llama"}
    assert all(isinstance(r["output"], str) and r["output"] == r["output"].strip() for r in rows)


def test_alpaca_eval_from_the_datasets_prompts_with_a_generator_name(tiny_model_dir, pairs_file, tmp_path):
    _export(tiny_model_dir, pairs_file, tmp_path / "eval", "--export", "alpaca_eval", "--export_generator", "mine")
    rows = json.loads((tmp_path / "eval" / "export" / "alpaca_eval" / "model_outputs.json").read_text())
    assert [r["instruction"] for r in rows] == [f"Say something {i}:" for i in range(4)]
    assert {r["generator"] for r in rows} == {"mine"}


def test_mt_bench_file_is_fastchats_answer_jsonl(tiny_model_dir, pairs_file, tmp_path):
    questions = _jsonl(tmp_path / "question.jsonl", MT_BENCH)
    results = _export(tiny_model_dir, pairs_file, tmp_path / "eval", "--export", "mt_bench",
                      "--export_questions", questions, "--export_generator", "dpo-rho1e-3")
    path = tmp_path / "eval" / "export" / "mt_bench" / "dpo-rho1e-3.jsonl"  # FastChat names the model by the file
    answers = {}
    for line in path.read_text().splitlines():  # FastChat's load_model_answers
        row = json.loads(line)
        answers[row["question_id"]] = row
    assert list(answers) == [81, 82, 83]
    for q in MT_BENCH:
        row = answers[q["question_id"]]
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == "dpo-rho1e-3" and isinstance(row["tstamp"], float)
        assert [set(c) for c in row["choices"]] == [{"index", "turns"}] and row["choices"][0]["index"] == 0
        turns = row["choices"][0]["turns"]  # common.py reads answer["choices"][0]["turns"][j]
        assert len(turns) == len(q["turns"]) and all(isinstance(t, str) for t in turns)
    assert len({r["answer_id"] for r in answers.values()}) == 3
    assert results["export"]["questions"] == 3 and results["export"]["responses"] == 5  # 2 + 2 + 1 turns


def test_mt_bench_turn_two_follows_turn_one_and_its_answer():
    """Greedy: turn 2's answer is the model's answer to [user 1, its own answer 1, user 2] (chat template)."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), seed=4)
    turns = [q["turns"] for q in MT_BENCH]
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "batch_size": 2, "progress": False}
    answers, cut = answer_conversations(model, tok, turns, **greedy)
    assert [len(a) for a in answers] == [2, 2, 1] and [len(c) for c in cut] == [2, 2, 1]
    for (first, second), (a1, a2) in zip((t for t in turns if len(t) == 2), answers, strict=False):
        alone = [{"role": "user", "content": first}]
        assert a1 == generate_responses(model, tok, [alone], **greedy)[0].strip()
        conversation = [*alone, {"role": "assistant", "content": a1}, {"role": "user", "content": second}]
        assert a2 == generate_responses(model, tok, [conversation], **greedy)[0].strip()


def test_arena_hard_file_is_arena_hard_autos_answer_jsonl(tiny_model_dir, pairs_file, tmp_path):
    questions = _jsonl(tmp_path / "question.jsonl", ARENA_HARD)
    results = _export(tiny_model_dir, pairs_file, tmp_path / "eval", "--export", "arena_hard",
                      "--export_questions", questions)
    path = tmp_path / "eval" / "export" / "arena_hard" / "tiny-llama.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"uid", "ans_id", "model", "messages", "tstamp"}] * 2
    assert [r["uid"] for r in rows] == [q["uid"] for q in ARENA_HARD]  # load_model_answers keys by uid
    for row, q in zip(rows, ARENA_HARD, strict=True):
        assert row["model"] == "tiny-llama"
        assert row["messages"][0] == {"role": "user", "content": q["prompt"]}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert isinstance(row["messages"][-1]["content"]["answer"], str)  # gen_judgment.py reads this
    export = results["export"]
    assert export["generation"] == {"do_sample": False, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                    "max_new_tokens": 4, "seed": 0, "batch_size": 2, "padding_side": "left",
                                    "use_cache": True}
    assert export["responses"] == 2 and 0 <= export["truncated"] <= 2 and export["samples_per_second"] > 0


def test_sampling_settings_are_recorded_for_the_win_rate_and_the_export(tiny_model_dir, pairs_file, tmp_path):
    reference = tmp_path / "reference"
    tok = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tok), seed=1).save_pretrained(reference)
    tok.save_pretrained(reference)
    questions = _jsonl(tmp_path / "question.jsonl", ARENA_HARD)
    main(["eval", "--model", str(tiny_model_dir), "--ref_model", str(reference), "--dataset_name", str(pairs_file),
          "--split", "train", "--max_samples", "4", "--max_length", "64", "--num_prompts", "2", "--judge", "vader",
          "--max_new_tokens", "3", "--temperature", "0.7", "--top_p", "0.9", "--gen_batch_size", "2", "--seed", "5",
          "--export", "arena_hard", "--export_questions", str(questions), "--output_dir", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    expected = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 3, "seed": 5,
                "batch_size": 2, "padding_side": "left", "use_cache": True}
    assert results["generation"] == expected  # the judged samples in eval_samples.jsonl
    assert results["export"]["generation"] == expected
    assert len((tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()) == 2


def test_questions_from_the_datasets_prompts_skip_multi_turn_ones():
    user = [{"role": "user", "content": "Hi"}]
    longer = [*user, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert questions_from_prompts(["raw", user, longer]) == [{"instruction": "raw"}, {"instruction": "Hi"}]
    with pytest.raises(DataError, match="--export_questions"):
        questions_from_prompts([longer])


def test_read_questions_takes_a_json_list_or_json_lines(tmp_path):
    as_list = tmp_path / "q.json"
    as_list.write_text(json.dumps(ALPACA_EVAL, indent=2))
    assert read_questions("alpaca_eval", as_list) == ALPACA_EVAL
    assert read_questions("alpaca_eval", _jsonl(tmp_path / "q.jsonl", ALPACA_EVAL)) == ALPACA_EVAL
    assert read_questions("mt_bench", _jsonl(tmp_path / "mt.jsonl", MT_BENCH)) == MT_BENCH


def test_the_clis_choices_are_the_benchmarks():
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    (export,) = [a for a in eval_parser._actions if a.dest == "export"]
    assert tuple(export.choices) == BENCHMARKS


# ---------------------------------------------------------------------------------------------------
# Mistakes: one line on stderr naming the file, row and field, exit code 2, before any model is loaded


def _fails(capsys, tmp_path, *flags) -> str:
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data.jsonl"),
            *map(str, flags)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_missing_question_file(capsys, tmp_path):
    line = _fails(capsys, tmp_path, "--export", "mt_bench", "--export_questions", tmp_path / "question.jsonl")
    assert f"{tmp_path / 'question.jsonl'}: no such file" in line


@pytest.mark.parametrize(("benchmark", "rows", "where"), [
    ("mt_bench", [MT_BENCH[0], {"question_id": 82, "turns": "one string"}], "line 2, field 'turns'"),
    ("mt_bench", [MT_BENCH[0], {"turns": ["Hi"]}], "line 2, field 'question_id'"),
    ("mt_bench", [MT_BENCH[0], {**MT_BENCH[1], "question_id": 81}], "line 2, field 'question_id': 81 repeats line 1"),
    ("arena_hard", [ARENA_HARD[0], {"uid": "x", "category": "c"}], "line 2, field 'prompt'"),
    ("arena_hard", [{"question_id": "q1", "turns": [{"content": "Hi"}]}], "line 1, field 'uid'"),
    ("alpaca_eval", [ALPACA_EVAL[0], {"input": "no instruction"}], "line 2, field 'instruction'"),
    ("alpaca_eval", [ALPACA_EVAL[0], ["not", "an", "object"]], "line 2: expected a JSON object"),
])
def test_a_row_without_a_field_the_tool_reads(capsys, tmp_path, benchmark, rows, where):
    path = _jsonl(tmp_path / "q.jsonl", rows)
    line = _fails(capsys, tmp_path, "--export", benchmark, "--export_questions", path)
    assert f"{path}: {where}" in line and benchmark in line


def test_a_json_list_item_and_a_broken_line_are_named(capsys, tmp_path):
    as_list = tmp_path / "alpaca_eval.json"
    as_list.write_text(json.dumps([ALPACA_EVAL[0], {"instruction": "  "}]))
    assert f"{as_list}: item 1, field 'instruction'" in _fails(capsys, tmp_path, "--export", "alpaca_eval",
                                                                 "--export_questions", as_list)
    broken = tmp_path / "question.jsonl"
    broken.write_text(json.dumps(MT_BENCH[0]) + "\n{not json\n")
    assert f"{broken}: line 2 is not JSON" in _fails(capsys, tmp_path, "--export", "mt_bench",
                                                     "--export_questions", broken)
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    assert f"{empty}: no questions" in _fails(capsys, tmp_path, "--export", "arena_hard", "--export_questions", empty)


def test_flags_that_need_each_other(capsys, tmp_path):
    assert "--export mt_bench needs --export_questions" in _fails(capsys, tmp_path, "--export", "mt_bench")
    assert "--export_questions q.jsonl needs --export" in _fails(capsys, tmp_path, "--export_questions", "q.jsonl")
    assert "--export_generator me needs --export" in _fails(capsys, tmp_path, "--export_generator", "me")
    assert "is not a file name" in _fails(capsys, tmp_path, "--export", "alpaca_eval", "--export_generator", "a/b")
    assert "invalid choice: 'alpaca'" in _fails(capsys, tmp_path, "--export", "alpaca")


def test_a_tokenizer_without_a_chat_template(capsys, tmp_path, pairs_file):
    model_dir = tmp_path / "plain"
    tok = make_tiny_tokenizer()
    tok.chat_template = None
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_dir), "--ref_model", str(model_dir), "--dataset_name", str(pairs_file),
              "--split", "train", "--export", "alpaca_eval"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "the tokenizer has no chat template; alpaca_eval questions are sent as chat turns" in err
