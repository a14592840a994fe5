"""A model's answers to AlpacaEval, MT-Bench or Arena-Hard questions, written in each official tool's input format.

The official tools then judge the files as they are (their judges are API models we do not call). The field
names follow each tool's own reader, checked in its repository:

- **AlpacaEval** (tatsu-lab/alpaca_eval, README "Evaluating a model"; ``alpaca_eval.main.evaluate`` and
  ``utils.get_generator_name``): a JSON list of ``{"instruction", "output", "generator"}``; the pairwise
  annotator matches our rows to the reference outputs on ``instruction``. Questions: the eval set
  (``alpaca_eval.json``, a JSON list, or JSON Lines) with an ``instruction`` field.
  Run: ``alpaca_eval --model_outputs model_outputs.json``.
- **MT-Bench** (lm-sys/FastChat, ``fastchat/llm_judge/gen_model_answer.py`` writes, ``common.py`` reads
  ``answer["choices"][0]["turns"][j]``): JSON Lines of ``{"question_id", "answer_id", "model_id",
  "choices": [{"index": 0, "turns": [str, ...]}], "tstamp"}``. Questions: ``data/mt_bench/question.jsonl``
  (``{"question_id", "category", "turns": [str, str]}``). Turn 2 is generated after the chat-templated turn 1
  and its answer, as ``gen_model_answer.py`` does. Copy the file to ``data/mt_bench/model_answer/``; the
  tool names the model after the file (``<model_id>.jsonl``).
- **Arena-Hard** (lmarena/arena-hard-auto at its 2025 layout, v0.1 and v2.0 alike: ``gen_answer.py`` writes,
  ``gen_judgment.py`` reads ``answer["messages"][-1]["content"]["answer"]``, keyed by ``uid``): JSON Lines of
  ``{"uid", "ans_id", "model", "messages": [{"role": "user", "content": prompt}, {"role": "assistant",
  "content": {"answer": str}}], "tstamp"}``. Questions: ``data/<bench>/question.jsonl`` (``{"uid",
  "category", "prompt"}``). Copy the file to ``data/<bench>/model_answer/`` (named ``<model_id>.jsonl``).
  Not written: ``metadata`` (token counts with OpenAI's tiktoken, read only by ``show_result.py
  --control-features``); ``utils/add_markdown_info.py`` of arena-hard-auto adds it.

Every question is sent as chat turns (the tokenizer's chat template), and answers are stripped of surrounding
whitespace, as FastChat and AlpacaEval do.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from .._atomic import write_json, write_text
from ..data import DataError
from ..models import ModelError
from .generate import generate_token_ids, generation_settings, stop_token_ids

logger = logging.getLogger("logitsam.eval")

BENCHMARKS = ("alpaca_eval", "mt_bench", "arena_hard")
_QUESTION_FILES = {"alpaca_eval": "AlpacaEval's eval set (alpaca_eval.json)",
                   "mt_bench": "FastChat's data/mt_bench/question.jsonl",
                   "arena_hard": "arena-hard-auto's data/<bench>/question.jsonl"}


def default_model_id(model_name_or_path: str | Path) -> str:
    """The name the answers are filed under when none is given: the model path's last part."""
    return Path(model_name_or_path).name or Path(model_name_or_path).resolve().name


def _records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for each item of a JSON list or each line of a JSON Lines file."""
    if not path.is_file():
        raise DataError(f"{path}: " + ("is a directory" if path.is_dir() else "no such file"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [(f"item {i}", r) for i, r in enumerate(whole)]
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not JSON ({e}); expected a JSON list or JSON Lines") from e
    return records


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_question(benchmark: str, record: Any) -> tuple[str, str] | None:
    """(field, what it must be) for the first field ``benchmark``'s tool needs that ``record`` lacks; None if fine."""
    if not isinstance(record, dict):
        return "", "a JSON object"
    if benchmark == "alpaca_eval":
        return None if _text(record.get("instruction")) else ("instruction", "a non-empty string")
    if benchmark == "mt_bench":
        qid, turns = record.get("question_id"), record.get("turns")
        if not isinstance(qid, int | str) or isinstance(qid, bool) or qid == "":
            return "question_id", "an integer or a non-empty string"
        if not (isinstance(turns, list) and turns and all(_text(t) for t in turns)):
            return "turns", "a non-empty list of non-empty strings"
        return None
    if not _text(record.get("uid")):
        hint = " (this row has the pre-2025 question_id/turns layout)" if "question_id" in record else ""
        return "uid", f"a non-empty string{hint}"
    return None if _text(record.get("prompt")) else ("prompt", "a non-empty string")


def read_questions(benchmark: str, path: str | Path) -> list[dict]:
    """The questions of ``benchmark`` from ``path`` (a JSON list or JSON Lines), each checked for the fields used.

    Raises:
        DataError: the file is missing or unreadable, or a row lacks a field or repeats an id; the message
            names the file, the row and the field.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark={benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    path = Path(path)
    key = {"mt_bench": "question_id", "arena_hard": "uid"}.get(benchmark)
    questions, seen = [], {}
    for where, record in _records(path):
        problem = _check_question(benchmark, record)
        if problem is not None:
            field, expected = problem
            got = record.get(field) if isinstance(record, dict) else record
            name = f", field '{field}'" if field else ""
            raise DataError(f"{path}: {where}{name}: expected {expected} for {benchmark} "
                            f"({_QUESTION_FILES[benchmark]}), got {repr(got)[:80]}")
        if key is not None:
            if record[key] in seen:
                raise DataError(f"{path}: {where}, field '{key}': {record[key]!r} repeats {seen[record[key]]}; "
                                f"{benchmark}'s tools key answers by it")
            seen[record[key]] = where
        questions.append(record)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def questions_from_prompts(prompts: list) -> list[dict]:
    """AlpacaEval questions from the eval dataset's prompts: a string, or a conversation of one user message.

    AlpacaEval is single-turn, so multi-turn prompts are skipped (counted and logged).
    """
    questions = []
    for p in prompts:
        if isinstance(p, str):
            questions.append({"instruction": p})
        elif len(p) == 1 and p[0].get("role") == "user":
            questions.append({"instruction": p[0]["content"]})
    if len(questions) < len(prompts):
        logger.info("alpaca_eval export: skipped %d of %d prompts that are not one user turn",
                    len(prompts) - len(questions), len(prompts))
    if not questions:
        raise DataError("alpaca_eval export: none of the eval dataset's prompts is a single user turn; "
                        "pass --export_questions with AlpacaEval's eval set")
    return questions


def answer_conversations(model, tokenizer, user_turns: list[list[str]], *, seed: int = 0,
                         **settings) -> tuple[list[list[str]], list[list[bool]]]:
    """Every conversation's assistant turns, batched turn by turn, and whether each was cut at ``max_new_tokens``.

    Turn ``j`` of every conversation that has one is generated in one ``generate_token_ids`` pass, after
    the chat-templated user turns ``0..j`` and the answers to ``0..j-1``, with seed ``seed + j x len(user_turns)``
    (so no two batches of a call share one). ``settings`` are ``generate_token_ids``'s.
    """
    stops = set(stop_token_ids(model, tokenizer))
    answers: list[list[str]] = [[] for _ in user_turns]
    cut: list[list[bool]] = [[] for _ in user_turns]
    for j in range(max(len(t) for t in user_turns)):
        rows = [i for i, turns in enumerate(user_turns) if len(turns) > j]
        conversations = []
        for i in rows:
            messages = []
            for user, bot in zip(user_turns[i][:j], answers[i], strict=True):
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": bot}]
            conversations.append(messages + [{"role": "user", "content": user_turns[i][j]}])
        ids = generate_token_ids(model, tokenizer, conversations, apply_chat_template=True,
                                 seed=seed + j * len(user_turns), **settings)
        for i, row in zip(rows, ids, strict=True):
            answers[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
            cut[i].append(not row or row[-1] not in stops)
    return answers, cut


def _alpaca_eval(questions, answers, model_id, tstamp) -> list[dict]:
    return [{"instruction": q["instruction"], "output": a[0], "generator": model_id}
            for q, a in zip(questions, answers, strict=True)]


def _mt_bench(questions, answers, model_id, tstamp) -> list[dict]:
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": tstamp} for q, a in zip(questions, answers, strict=True)]


def _arena_hard(questions, answers, model_id, tstamp) -> list[dict]:
    return [{"uid": q["uid"], "ans_id": uuid.uuid4().hex, "model": model_id,
             "messages": [{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": {"answer": a[0]}}],
             "tstamp": tstamp} for q, a in zip(questions, answers, strict=True)]


_FORMATS = {"alpaca_eval": _alpaca_eval, "mt_bench": _mt_bench, "arena_hard": _arena_hard}


def export_path(benchmark: str, output_dir: str | Path, model_id: str) -> Path:
    """Where ``export_answers`` writes: ``<output_dir>/<benchmark>/`` + ``model_outputs.json`` (AlpacaEval's
    name) or ``<model_id>.jsonl`` (the name FastChat and arena-hard-auto take the model's from)."""
    name = "model_outputs.json" if benchmark == "alpaca_eval" else f"{model_id}.jsonl"
    return Path(output_dir) / benchmark / name


def check_chat_template(tokenizer, benchmark: str) -> None:
    """Raises ``ModelError`` when ``tokenizer`` has no chat template: the questions are sent as chat turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; {benchmark} questions are "
                         "sent as chat turns")


def export_answers(model, tokenizer, benchmark: str, questions: list[dict], *, model_id: str,
                   output_dir: str | Path, progress: bool = True, **gen) -> dict:
    """Answer ``questions`` (from ``read_questions`` or ``questions_from_prompts``) and write them for ``benchmark``.

    ``gen`` are ``generation_settings``'s keywords (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
    ``batch_size``, ``seed``); the official generators use ``max_new_tokens`` 1024 (FastChat) to 4096 and more
    (arena-hard-auto), and FastChat a temperature per MT-Bench category, which one call here does not.

    Returns:
        What ``eval_results.json`` records under ``export``: the file, the counts of questions, responses (one a
        turn) and truncated responses (cut at ``max_new_tokens``), the wall time, samples (responses) per
        second and the ``generation_settings``.
    """
    check_chat_template(tokenizer, benchmark)
    settings = generation_settings(**gen)
    if benchmark == "mt_bench":
        user_turns = [q["turns"] for q in questions]
    else:
        user_turns = [[q["instruction" if benchmark == "alpaca_eval" else "prompt"]] for q in questions]
    start = time.perf_counter()
    answers, cut = answer_conversations(model, tokenizer, user_turns, progress=progress, **gen)
    seconds = time.perf_counter() - start
    rows = _FORMATS[benchmark](questions, answers, model_id, time.time())
    path = export_path(benchmark, output_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if benchmark == "alpaca_eval":
        write_json(path, rows, indent=2, ensure_ascii=False)
    else:
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    responses = sum(len(row) for row in cut)
    truncated = sum(sum(row) for row in cut)
    if truncated:
        logger.warning("%s export: %d of %d responses were cut at max_new_tokens=%d", benchmark, truncated,
                       responses, settings["max_new_tokens"])
    logger.info("wrote %d %s answers to %s (%.2f samples/s)", len(rows), benchmark, path, responses / seconds)
    return {"benchmark": benchmark, "file": str(path), "model_id": model_id, "questions": len(questions),
            "responses": responses, "truncated": truncated, "seconds": seconds,
            "samples_per_second": responses / seconds, "generation": settings}
