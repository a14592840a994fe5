"""Token identity on real pairs: the default tokenisation against (a) a reference rendering written out here from
each model's published chat template and (b) TRL 1.16's own DPOTrainer preprocessing and collator.

The tokenizer is the embedded SmolLM2 BPE tokenizer with each template (and its special tokens) set on it.
Data: the shipped sentiment pairs (conversational, TRL's prompt/chosen/rejected message lists), the
conversational fixture (system turn, multi-turn) and real HH-RLHF rows (skipped when ../shared/data is absent).
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest

import logitsam
from logitsam.data import build_preference_dataset, load_preference_examples, tokenize_examples

FIXTURES = Path(__file__).parent / "fixtures"
SENTIMENT = Path(logitsam.__file__).parent / "resources" / "sentiment" / "train.jsonl"

# --- the published chat templates (tokenizer_config.json "chat_template"), verbatim ---------------------

# HuggingFaceTB/SmolLM2-135M-Instruct: ChatML with a default system turn.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# HuggingFaceH4/zephyr-7b-beta (also TinyLlama-1.1B-Chat): writes no BOS.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# google/gemma-2-2b-it (gemma-2b-it's, with the system-role check)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Qwen/Qwen2.5-0.5B-Instruct (the tool-calling branches never fire without tools)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501


# --- reference renderings: each template's output written out in Python ---------------------------------

def _chatml(default_system: str):
    def render(messages, add_generation_prompt):
        text = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{default_system}<|im_end|>\n"
        text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    return render


def _zephyr(messages, add_generation_prompt):
    text = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def _llama3(messages, add_generation_prompt):
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _gemma(messages, add_generation_prompt):
    if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(messages)):
        return None  # the template raises: no system turn, user/assistant strictly alternating
    text = "<bos>" + "".join(
        f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content'].strip()}<end_of_turn>\n"
        for m in messages
    )
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class Case:
    template: str
    render: Callable  # (messages, add_generation_prompt) -> text, or None where the template raises
    turn_end: str  # how the template closes the assistant turn: the completion ends with it
    bos: str | None = None  # the tokenizer's BOS, which it adds to plain text (add_bos_token)
    eos: str | None = None
    specials: tuple[str, ...] = field(default=())
    no_bos: bool = False  # the model has no BOS token (Qwen)


CASES = {
    "chatml-smollm2": Case(SMOLLM2, _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                           "<|im_end|>\n"),
    "qwen2.5": Case(QWEN25, _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
                    "<|im_end|>\n", no_bos=True),
    "zephyr": Case(ZEPHYR, _zephyr, "</s>\n", bos="<s>", eos="</s>", specials=("<|user|>", "<|assistant|>")),
    "llama3": Case(LLAMA3, _llama3, "<|eot_id|>", bos="<|begin_of_text|>", eos="<|eot_id|>",
                   specials=("<|start_header_id|>", "<|end_header_id|>")),
    "gemma": Case(GEMMA, _gemma, "<end_of_turn>\n", bos="<bos>", eos="<eos>",
                  specials=("<start_of_turn>", "<end_of_turn>")),
}
TEMPLATE_WRITES_BOS = {"llama3", "gemma"}  # and zephyr's does not: its BOS is added by logitsam


@cache
def _smollm2():
    from logitsam.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def tokenizer_for(name: str):
    """The SmolLM2 BPE tokenizer set up as the model behind template ``name``."""
    case, tok = CASES[name], copy.deepcopy(_smollm2())
    if case.specials:
        tok.add_tokens(list(case.specials), special_tokens=True)
    if case.bos:
        tok.add_special_tokens({"bos_token": case.bos, "eos_token": case.eos})
        tok.add_bos_token = True
    if case.no_bos:
        tok.bos_token = None
    tok.chat_template = case.template
    return tok


def _prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


def reference_pair(name: str, tok, prompt: list[dict], chosen: str, rejected: str):
    """Expected ``(prompt tokens, chosen ids, rejected ids)`` from the written-out template; None if it raises.

    Each sequence is the rendered conversation tokenised whole (plus the BOS the tokenizer adds to plain text
    where the template writes none). The prompt is the part those share with the tokenised prompt + generation
    prompt: TRL's rule when BPE merges across the boundary.
    """
    case = CASES[name]
    if case.render(prompt, True) is None:
        return None
    lead = [tok.bos_token_id] if case.bos and name not in TEMPLATE_WRITES_BOS else []

    def encode(text):
        return lead + tok(text, add_special_tokens=False)["input_ids"]

    prompt_ids = encode(case.render(prompt, True))
    full = [encode(case.render(prompt + [{"role": "assistant", "content": r}], False)) for r in (chosen, rejected)]
    for response, ids in zip((chosen, rejected), full, strict=True):
        # the reference is right: whole conversation = prompt text + the response's turn, closed by turn_end
        assert tok.decode(ids, skip_special_tokens=False).endswith(response.strip() + case.turn_end)
    return min(_prefix(prompt_ids, ids) for ids in full), *full


def ours(dataset) -> dict[int, tuple]:
    """``{row: (chosen ids, chosen completion mask, rejected ids, rejected completion mask)}``."""
    out = {}
    for ex in dataset:
        out[ex["row"]] = tuple(x for side in ("chosen", "rejected") for x in
                               (ex[f"{side}_input_ids"], [int(t != -100) for t in ex[f"{side}_labels"]]))
    return out


def trl_sequences(rows: list[dict], tok, max_length: int | None, truncation_mode: str = "keep_start"):
    """TRL 1.16 on ``rows``: ``DPOTrainer._prepare_dataset`` (prompt extraction, EOS, tokenisation, drop rule)
    and ``DataCollatorForPreference`` (truncation), in the same ``{row: ...}`` shape as `ours`."""
    from datasets import Dataset, disable_progress_bars
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    disable_progress_bars()
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    trainer = SimpleNamespace(_tokenizer=tok)  # the one trainer attribute _prepare_dataset reads
    prepared = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tok, args, "train")
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                        truncation_mode=truncation_mode)
    out = {}
    for ex in prepared:
        batch = collate([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        lengths = batch["attention_mask"].sum(1).tolist()
        out[ex["row"]] = tuple(x for i, n in enumerate(lengths) for x in
                               (batch["input_ids"][i, :n].tolist(), batch["completion_mask"][i, :n].tolist()))
    return out


def _jsonl(path: Path, n: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def _conversational_file(tmp_path) -> Path:
    """40 sentiment pairs (TRL's explicit-prompt layout) + the fixture's system and multi-turn rows."""
    rows = _jsonl(SENTIMENT, 40) + _jsonl(FIXTURES / "conversational.jsonl", 3)
    path = tmp_path / "conversational.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _as_trl_rows(examples) -> list[dict]:
    return [{"row": ex["row"], "prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": ex["chosen"]}],
             "rejected": [{"role": "assistant", "content": ex["rejected"]}]} for ex in examples]


# --- the tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_conversational_pairs_match_the_template_reference_and_trl(name, tmp_path):
    tok = tokenizer_for(name)
    path = _conversational_file(tmp_path)
    dataset, report = build_preference_dataset(path, tok, max_length=None, on_invalid="drop")
    examples, _ = load_preference_examples(path)
    got = ours(dataset)

    expected_rows = []
    for ex in examples:
        ref = reference_pair(name, tok, ex["prompt"], ex["chosen"], ex["rejected"])
        if ref is None:
            assert ex["row"] not in got  # the real template raised too: counted, not kept
            continue
        expected_rows.append(ex)
        n, chosen, rejected = ref
        assert got[ex["row"]] == (chosen, [0] * n + [1] * (len(chosen) - n),
                                  rejected, [0] * n + [1] * (len(rejected) - n)), ex["row"]
    assert len(got) == len(expected_rows) == report.kept
    assert report.counts == ({"chat_template_error": 1} if name == "gemma" else {})  # its system-turn row

    first = dataset[0]["chosen_input_ids"]
    if CASES[name].bos:  # exactly one BOS, whether the template writes it or logitsam adds it
        assert first[0] == tok.bos_token_id and first.count(tok.bos_token_id) == 1
    completion = [t for t in dataset[0]["chosen_labels"] if t != -100]
    assert tok.decode(completion, skip_special_tokens=False).endswith(CASES[name].turn_end)

    pytest.importorskip("trl")
    trl = trl_sequences(_as_trl_rows(expected_rows), tok, max_length=None)
    if name == "zephyr":  # TRL 1.16 loses the BOS that Zephyr's template does not write; logitsam keeps it
        trl = {row: ([tok.bos_token_id] + t[0], [0] + t[1], [tok.bos_token_id] + t[2], [0] + t[3])
               for row, t in trl.items()}
    assert got == trl


@pytest.mark.parametrize("name", ["chatml-smollm2", "llama3", "zephyr"])
def test_real_hh_through_each_template(name, hh_path):
    """HH transcripts parsed into turns and rendered with ``apply_chat_template=True``."""
    tok = tokenizer_for(name)
    dataset, _ = build_preference_dataset(hh_path, tok, split="train[:40]", max_length=None,
                                          apply_chat_template=True, on_invalid="drop")
    examples, _ = load_preference_examples(hh_path, split="train[:40]", on_invalid="drop")
    got = ours(dataset)
    for ex in examples:
        n, chosen, rejected = reference_pair(name, tok, ex["prompt"], ex["chosen"], ex["rejected"])
        assert got[ex["row"]] == (chosen, [0] * n + [1] * (len(chosen) - n),
                                  rejected, [0] * n + [1] * (len(rejected) - n)), ex["row"]
    pytest.importorskip("trl")
    trl = trl_sequences(_as_trl_rows(examples), tok, max_length=None)
    if name == "zephyr":
        trl = {row: ([tok.bos_token_id] + t[0], [0] + t[1], [tok.bos_token_id] + t[2], [0] + t[3])
               for row, t in trl.items()}
    assert got == trl


@pytest.mark.parametrize("truncation_mode, max_length", [("keep_start", 256), ("keep_end", 256), ("keep_start", None)])
def test_real_hh_raw_text_matches_trl_rows_and_tokens(truncation_mode, max_length, hh_path):
    """The default on HH (raw text, character-level prompt, whole-sequence truncation) is TRL's, token for token.

    TRL keeps the rows that logitsam's validation drops (row 86's chosen response is " "); every other
    row is kept or dropped alike, including the prompts that fill ``max_length``.
    """
    trl_module = pytest.importorskip("trl")
    assert trl_module.__version__.startswith("1.16")
    tok = tokenizer_for("chatml-smollm2")
    dataset, report = build_preference_dataset(hh_path, tok, split="train[:300]", max_length=max_length,
                                               truncation_mode=truncation_mode, on_invalid="drop")
    raw = [{"row": i, "chosen": r["chosen"], "rejected": r["rejected"]} for i, r in enumerate(_jsonl(hh_path, 300))]
    trl = trl_sequences(raw, tok, max_length=max_length, truncation_mode=truncation_mode)
    got = ours(dataset)
    assert set(trl) - set(got) == {86} and report.counts.pop("empty_response") == 1
    assert report.counts == ({"prompt_too_long": len(raw) - len(trl)} if max_length and truncation_mode ==
                             "keep_start" else {})
    if max_length and truncation_mode == "keep_start":
        assert report.counts["prompt_too_long"] > 0  # the drop rule was exercised
    assert got == {row: trl[row] for row in got}
    shared_start = [ex for ex in load_preference_examples(hh_path, split="train[:300]", on_invalid="drop")[0]
                    if not ex["text"][0].endswith("Assistant:")]
    assert len(shared_start) > 30  # many HH pairs share a response start: it is prompt in both


def test_tokenize_examples_on_hh_equals_build(hh_path):
    """The raw split is carried by the examples, so tokenising examples gives the built dataset's tokens."""
    tok = tokenizer_for("chatml-smollm2")
    examples, _ = load_preference_examples(hh_path, split="train[:20]")
    columns = tokenize_examples(examples, tok)
    dataset, _ = build_preference_dataset(hh_path, tok, split="train[:20]")
    assert columns["chosen_input_ids"] == dataset["chosen_input_ids"]
    row8 = columns["row"].index(8)  # "I had a lot of sex..." against "I am having sex...": the "I" is prompt
    prompt = tok.decode(columns["chosen_input_ids"][row8][: columns["prompt_length"][row8]])
    assert prompt.endswith("So you have a lot of sex?\n\nAssistant: I")
