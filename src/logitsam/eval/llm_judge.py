"""Pairwise LLM judge over the OpenAI chat-completions API: policy vs opponent win rates, as the DPO paper reports.

    judge = LLMJudge(LLMJudgeConfig(model="gpt-4o", template="dpo_dialogue"))
    report = judge.compare(prompts, policy_responses, opponent_responses, out_dir="runs/eval")
    report.win_rate            # {"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses", "invalid"}

Any server that speaks the chat-completions protocol works (OpenAI, vLLM, SGLang, llama.cpp, Ollama): set
``base_url`` (or $OPENAI_BASE_URL); a local server without a key gets the dummy key "EMPTY".

Each pair is asked in both orders (A = policy, then A = opponent) unless ``both_orders=False``; two verdicts that
agree stand, two that disagree make a tie, and the share of agreeing pairs is the position-consistency rate.
A judge answer that the template's parser cannot read is an invalid verdict: the pair is reported as invalid and
left out of the win rate, never counted as a loss.

Templates are text files: shipped ones by name (``TEMPLATE_NAMES``), or your own by path. A file starts with ``#``
header lines, then an optional ``[system]`` section and a ``[user]`` section (no marker: the whole body is the
user message); ``{prompt}``, ``{response_a}`` and ``{response_b}`` are filled in. Header directives:

    # parser: label | mt_bench | arena_hard | alpaca_eval | regex     (required)
    # label: More helpful           the "label" parser: the answer's line "More helpful: A" (or B)
    # tokens: m M                   the "alpaca_eval" parser: the identifiers of output A and output B
    # verdict A: <regex>            the "regex" parser: a pattern per outcome (A, B, and optionally tie)
    # max_tokens: 256               the answer budget when the config does not set one (default 1024)

Other ``#`` lines are comments; each shipped template says in them which published protocol it follows.
The label, mt_bench, arena_hard and regex parsers read a verdict only when all the verdict markers in the answer
agree (Arena-Hard's rule); none, or markers that contradict each other, make the answer invalid. The alpaca_eval
parser reads the first token's probabilities, else the whole answer as one identifier.

Requests are cached on disk (one JSON file per request, keyed by a hash of the model, the server URL, the
messages and the configured request parameters), so an interrupted or repeated evaluation does not pay twice.
Reasoning models that refuse ``temperature``, ``max_tokens`` or ``logprobs`` with a 400 error get the request
again without it (``max_completion_tokens`` for ``max_tokens``); the judge logs this and stops sending it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
import math
import os
import random
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._atomic import write_json, write_text
from ..models import cache_root
from .generate import Prompt
from .stats import judged_win_rate, length_adjusted_win_rate

logger = logging.getLogger(__name__)

TEMPLATE_NAMES = ("dpo_dialogue", "dpo_summary", "mt_bench_pair", "arena_hard", "alpaca_eval")
PARSERS = ("label", "mt_bench", "arena_hard", "alpaca_eval", "regex")
TOP_LOGPROBS = 5  # alternatives asked for at the first answer token (the alpaca_eval parser), as AlpacaEval does
# Arena-Hard's five verdicts; strong and weak preferences both count as a win or a loss
ARENA_SCORES = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}
_HEADER_KEY = re.compile(r"#\s*(parser|label|tokens|max_tokens|verdict (?:A|B|tie))\s*:\s*(.*)$")
_SPEAKERS = {"user": "User", "assistant": "Assistant", "system": "System"}


def _import_openai():
    try:
        import openai
    except ImportError as err:
        raise ImportError("the LLM judge needs the OpenAI client: pip install 'logitsam[judge]'") from err
    return openai


# ---------------------------------------------------------------------------------------------------
# Templates and verdict parsers


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One parsed answer: ``score`` is response A's win score (1 A wins, 0.5 tie, 0 B wins, or a probability);
    ``label`` is the verdict as the answer gave it ("A", "B", "tie", "A>>B", ...)."""

    score: float
    label: str


def _agreed(labels: list[str], scores: dict[str, float]) -> Verdict | None:
    """The verdict when every marker found names the same known label; None when there is none or they clash."""
    if len(set(labels)) != 1 or labels[0] not in scores:
        return None
    return Verdict(scores[labels[0]], labels[0])


def parse_label(answer: str, label: str) -> Verdict | None:
    """``<label>: A`` or ``<label>: B`` on a line of its own (markdown bold and quotes allowed; the label's case
    is free, the letter's is not)."""
    pattern = rf"^[\s*_#>]*(?i:{re.escape(label)})[\s*_]*:[\s*_]*[\"'(\[]?([AB])\b"
    return _agreed(re.findall(pattern, answer, flags=re.MULTILINE), {"A": 1.0, "B": 0.0})


def parse_mt_bench(answer: str) -> Verdict | None:
    """MT-Bench's ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie). MT-Bench itself takes the first of A, B, C that occurs
    anywhere, which favours A; here clashing markers make the answer invalid."""
    labels = ["tie" if x == "C" else x for x in re.findall(r"\[\[([ABC])\]\]", answer)]
    return _agreed(labels, {"A": 1.0, "B": 0.0, "tie": 0.5})


def parse_arena_hard(answer: str) -> Verdict | None:
    """Arena-Hard's ``[[A>>B]]``, ``[[A>B]]``, ``[[A=B]]``, ``[[B>A]]`` or ``[[B>>A]]``; the label keeps the five-way
    verdict, the score maps strong and weak alike to a win or a loss."""
    labels = [re.sub(r"\s+", "", x) for x in re.findall(r"\[\[\s*([AB]\s*[<>=]{1,2}\s*[AB])\s*\]\]", answer)]
    return _agreed(labels, ARENA_SCORES)


def parse_alpaca_eval(
    answer: str, top_logprobs: list[tuple[str, float]] | None, tokens: tuple[str, str] = ("m", "M")
) -> Verdict | None:
    """AlpacaEval's single identifier: ``tokens[0]`` names output A, ``tokens[1]`` output B.

    With the first answer token's top log-probs, the score is P(A) / (P(A) + P(B)), each summed over the
    alternatives that equal the identifier after stripping whitespace; without them (or when neither identifier is
    among them) it is read from the text, which must be the identifier alone (quotes and a full stop allowed).
    """
    mass = [0.0, 0.0]
    for token, logprob in top_logprobs or []:
        for side, ident in enumerate(tokens):
            if token.strip() == ident:
                mass[side] += math.exp(logprob)
    if mass[0] + mass[1] > 0:
        p = mass[0] / (mass[0] + mass[1])
        return Verdict(p, "A" if p > 0.5 else "B" if p < 0.5 else "tie")
    text = answer.strip().strip("\"'`.").strip()
    return {tokens[0]: Verdict(1.0, "A"), tokens[1]: Verdict(0.0, "B")}.get(text)


def parse_regex(answer: str, patterns: dict[str, str]) -> Verdict | None:
    """A user template's own patterns, one per outcome (``A``, ``B``, optionally ``tie``); each match is a marker."""
    found = sorted((m.start(), outcome) for outcome, pattern in patterns.items() for m in re.finditer(pattern, answer))
    return _agreed([outcome for _, outcome in found], {"A": 1.0, "B": 0.0, "tie": 0.5})


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt (system and user text with ``{prompt}``, ``{response_a}``, ``{response_b}``) and its parser."""

    name: str
    system: str
    user: str
    parser: str
    label: str | None = None  # the "label" parser's line name
    tokens: tuple[str, str] = ("m", "M")  # the "alpaca_eval" parser's identifiers of A and B
    patterns: dict[str, str] = dataclasses.field(default_factory=dict)  # the "regex" parser: outcome -> regex
    max_tokens: int = 1024

    @property
    def uses_logprobs(self) -> bool:
        return self.parser == "alpaca_eval"

    def messages(self, prompt: str, response_a: str, response_b: str) -> list[dict[str, str]]:
        """The chat messages, placeholders filled in one pass (a response that contains "{response_b}" stays as is)."""
        values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}

        def fill(text: str) -> str:
            return re.sub(r"\{(prompt|response_a|response_b)\}", lambda m: values[m.group(1)], text)

        system = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return [*system, {"role": "user", "content": fill(self.user)}]

    def parse(self, answer: str, top_logprobs: list[tuple[str, float]] | None = None) -> Verdict | None:
        """Response A's win score and label from the judge's answer, or None when the answer is invalid."""
        if self.parser == "label":
            return parse_label(answer, self.label)
        if self.parser == "mt_bench":
            return parse_mt_bench(answer)
        if self.parser == "arena_hard":
            return parse_arena_hard(answer)
        if self.parser == "alpaca_eval":
            return parse_alpaca_eval(answer, top_logprobs, self.tokens)
        return parse_regex(answer, self.patterns)


def parse_template(text: str, name: str) -> JudgeTemplate:
    """A template from its file text (format in the module docstring); errors name ``name`` and the problem."""
    lines = text.splitlines()
    header = []
    while lines and lines[0].startswith("#"):
        header.append(lines.pop(0))
    keys: dict[str, str] = {}
    for line in header:
        if match := _HEADER_KEY.match(line):
            keys[match.group(1)] = match.group(2).strip()
    sections = {"system": [], "user": []}
    current = "user" if not any(line.strip() in ("[system]", "[user]") for line in lines) else None
    for line in lines:
        if line.strip() in ("[system]", "[user]"):
            current = line.strip()[1:-1]
        elif current is not None:
            sections[current].append(line)
        elif line.strip():
            raise ValueError(f"judge template {name}: text before the first [system] or [user] line: {line!r}")
    system, user = ("\n".join(sections[k]).strip() for k in ("system", "user"))
    parser = keys.get("parser")
    if parser not in PARSERS:
        raise ValueError(f"judge template {name}: '# parser: {parser}' is not one of {', '.join(PARSERS)}; "
                         "declare one in the header, e.g. '# parser: regex' with '# verdict A: ...' lines")
    for placeholder in ("{prompt}", "{response_a}", "{response_b}"):
        if placeholder not in system + user:
            raise ValueError(f"judge template {name}: the placeholder {placeholder} is missing")
    patterns = {k.split()[1]: v for k, v in keys.items() if k.startswith("verdict ")}
    if parser == "label" and not keys.get("label"):
        raise ValueError(f"judge template {name}: the label parser needs a '# label: <name>' line")
    if parser == "regex":
        if not {"A", "B"} <= patterns.keys():
            raise ValueError(f"judge template {name}: the regex parser needs '# verdict A:' and '# verdict B:' lines")
        for outcome, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"judge template {name}: verdict {outcome} pattern {pattern!r}: {err}") from err
    tokens = tuple(keys.get("tokens", "m M").split())
    if len(tokens) != 2 or tokens[0] == tokens[1]:
        raise ValueError(f"judge template {name}: '# tokens: {keys['tokens']}' must name two different identifiers")
    max_tokens = keys.get("max_tokens", "1024")
    if not max_tokens.isdigit() or int(max_tokens) < 1:
        raise ValueError(f"judge template {name}: '# max_tokens: {max_tokens}' must be a positive integer")
    return JudgeTemplate(name, system, user, parser, keys.get("label"), tokens, patterns, int(max_tokens))


def load_template(name_or_path: str | os.PathLike) -> JudgeTemplate:
    """A shipped template by name (``TEMPLATE_NAMES``) or a template file by path."""
    if str(name_or_path) in TEMPLATE_NAMES:
        resource = importlib.resources.files("logitsam.eval") / "templates" / f"{name_or_path}.txt"
        return parse_template(resource.read_text(encoding="utf-8"), str(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"judge template {str(name_or_path)!r} is neither a shipped template "
                         f"({', '.join(TEMPLATE_NAMES)}) nor a file")
    return parse_template(path.read_text(encoding="utf-8"), str(path))


def render_conversation(prompt: Prompt) -> str:
    """A prompt as the judge reads it: a string as is, a conversation as ``User: ...`` / ``Assistant: ...`` turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{_SPEAKERS.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------------------------------
# The judge


@dataclasses.dataclass
class LLMJudgeConfig:
    """Settings of an ``LLMJudge``; ``model`` is the only one without a default."""

    model: str = dataclasses.field(metadata={"help": "Judge model name as the server knows it, e.g. gpt-4o."})
    template: str = dataclasses.field(default="dpo_dialogue", metadata={
        "help": f"Shipped template ({', '.join(TEMPLATE_NAMES)}) or a template file path."})
    base_url: str | None = dataclasses.field(default=None, metadata={
        "help": "Server URL (…/v1); default $OPENAI_BASE_URL, else OpenAI's."})
    api_key: str | None = dataclasses.field(default=None, metadata={
        "help": "Default $OPENAI_API_KEY; with a base_url and no key, 'EMPTY' (local servers)."})
    both_orders: bool = dataclasses.field(default=True, metadata={
        "help": "Ask each pair in both orders (a disagreement is a tie); else one seeded random order per pair."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the per-pair order when both_orders=False."})
    concurrency: int = dataclasses.field(default=8, metadata={"help": "Requests in flight at once."})
    timeout: float = dataclasses.field(default=120.0, metadata={"help": "Seconds per HTTP request."})
    max_retries: int = dataclasses.field(default=5, metadata={
        "help": "Retries of a request on 408/409/429/5xx, timeouts and connection errors, with exponential "
                "backoff (the openai client's: 0.5 s doubling to 8 s, with jitter; Retry-After honoured)."})
    max_tokens: int | None = dataclasses.field(default=None, metadata={
        "help": "Answer budget; default the template's. Reasoning models spend it on reasoning too: raise it."})
    temperature: float | None = dataclasses.field(default=0.0, metadata={
        "help": "Sampling temperature; None sends none (the server's default)."})
    cache_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "Request cache directory; default <logitsam cache>/judge ($LOGITSAM_CACHE or ~/.cache/logitsam)."})
    use_cache: bool = dataclasses.field(default=True, metadata={"help": "Read and write the request cache."})
    progress: bool = dataclasses.field(default=True, metadata={"help": "Show a progress bar over requests."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is empty; name the judge model, e.g. model='gpt-4o'")
        for key in ("concurrency", "max_tokens"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key}={value!r}; must be an integer >= 1")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries!r}; must be an integer >= 0")
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout}; must be > 0 seconds")


@dataclasses.dataclass
class JudgeReport:
    """What ``LLMJudge.compare`` found. Pair counts are in ``win_rate``; ``judgments`` has one record per request.

    Attributes:
        ids: pair ids, in input order.
        scores: the policy's win score per pair in [0, 1], None when a verdict was invalid.
        judgments: one dict per request, as written to ``judgments.jsonl``.
        win_rate: ``judged_win_rate(scores)`` (ties as half a win), or None when no verdict was valid.
        length_adjusted: ``length_adjusted_win_rate`` on the character-length difference, or None.
        consistency: share of pairs whose two orders agree, among pairs with two valid verdicts (both-orders
            mode), else None.
        invalid_answers: requests whose answer did not parse (or was refused with a 400 error).
        usage: ``prompt_tokens`` and ``completion_tokens`` summed over requests sent (cache hits not counted),
            ``requests`` sent and ``cached`` hits.
        adjustments: request parameters the server refused and the judge stopped sending (reasoning models).
    """

    ids: list[str]
    scores: list[float | None]
    judgments: list[dict[str, Any]]
    win_rate: dict[str, float | int] | None
    length_adjusted: dict[str, float | int] | None
    consistency: float | None
    invalid_answers: int
    usage: dict[str, int]
    adjustments: list[str]

    def summary(self) -> dict[str, float | int | None]:
        """Flat numbers for a results file: the win rate and its counts, length-adjusted rate, consistency, usage."""
        rate = self.win_rate or {"win_rate": None, "ci_low": None, "ci_high": None, "n": 0, "wins": 0, "ties": 0,
                                 "losses": 0}
        counts = {"invalid": len(self.scores)} if self.win_rate is None else {}
        lc = self.length_adjusted or {}
        return {**rate, **counts, "length_adjusted_win_rate": lc.get("length_adjusted_win_rate"),
                "consistency": self.consistency, "invalid_answers": self.invalid_answers, **self.usage}


class LLMJudge:
    """Pairwise judge: asks a chat model which of two responses is better and turns the answers into a win rate.

    Args:
        config: the settings (``LLMJudgeConfig``).
        http_client: an ``httpx`` client for the openai client to send through (a proxy, custom TLS, or a
            ``MockTransport`` in tests); by default the openai client makes its own.
    """

    def __init__(self, config: LLMJudgeConfig, *, http_client: Any = None) -> None:
        self._openai = _import_openai()
        self.config = config
        self.template = load_template(config.template)
        base_url = config.base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = config.api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if base_url else None)
        if api_key is None:
            raise ValueError("no API key for the LLM judge: set OPENAI_API_KEY or api_key, or base_url for a "
                             "local server (which then gets the key 'EMPTY')")
        self.client = self._openai.OpenAI(api_key=api_key, base_url=base_url, timeout=config.timeout,
                                          max_retries=config.max_retries, http_client=http_client)
        self.max_tokens = config.max_tokens or self.template.max_tokens
        self.cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else cache_root() / "judge"
        self._refused: set[str] = set()  # parameters the server rejected: "temperature", "max_tokens", "logprobs"
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> LLMJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request ------------------------------------------------------------------------------

    def _requested_params(self) -> dict[str, Any]:
        """The parameters as configured; the cache key uses these, so a rerun hits before any refusal is relearned."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.config.temperature is not None:
            params["temperature"] = self.config.temperature
        if self.template.uses_logprobs:
            params |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return params

    def _wire_params(self) -> dict[str, Any]:
        """The parameters sent: the requested ones less those the server refused."""
        params = self._requested_params()
        with self._lock:
            refused = set(self._refused)
        if "max_tokens" in refused:
            params["max_completion_tokens"] = params.pop("max_tokens")
        if "logprobs" in refused:
            params.pop("logprobs", None)
            params.pop("top_logprobs", None)
        if "temperature" in refused:
            params.pop("temperature", None)
        return params

    def _send(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One chat completion, as a plain dict. A 400 that names temperature, max_tokens or logprobs is retried
        without it (max_completion_tokens instead of max_tokens), and later requests skip it too."""
        dropped: set[str] = set()  # each parameter is dropped once per request at most, so this loop ends
        while True:
            params = self._wire_params()
            try:
                completion = self.client.chat.completions.create(model=self.config.model, messages=messages,
                                                                 **params)
                return completion.model_dump(mode="json")
            except self._openai.BadRequestError as err:
                name = refused_param(err, params)
                if name is None or name in dropped:
                    raise
                dropped.add(name)
                with self._lock:
                    new = name not in self._refused
                    self._refused.add(name)
                if new:
                    logger.warning("judge model %s refused %r (%s); retrying without it%s, and not sending it again",
                                   self.config.model, name, err.message,
                                   ": max_completion_tokens instead" if name == "max_tokens" else "")

    def _cache_key(self, messages: list[dict[str, str]]) -> str:
        payload = {"model": self.config.model, "base_url": str(self.client.base_url), "messages": messages,
                   "params": self._requested_params()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _complete(self, messages: list[dict[str, str]]) -> tuple[dict[str, Any], bool]:
        """The response for ``messages`` and whether it came from the cache."""
        path = self.cache_dir / (key := self._cache_key(messages))[:2] / f"{key}.json"
        if self.config.use_cache and path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))["response"], True
            except (json.JSONDecodeError, KeyError) as err:
                logger.warning("judge cache entry %s is unreadable (%s); asking again", path, err)
        response = self._send(messages)
        if self.config.use_cache:
            write_json(path, {"model": self.config.model, "response": response})
        return response, False

    def _judge(self, pair_id: str, prompt: str, response_a: str, response_b: str) -> dict[str, Any]:
        """One request's record: the answer, its verdict for A, usage, and whether it was cached."""
        record: dict[str, Any] = {"answer": None, "finish_reason": None, "label": None, "score_a": None,
                                  "error": None, "cached": False, "usage": {"prompt_tokens": 0, "completion_tokens": 0}}
        try:
            response, record["cached"] = self._complete(self.template.messages(prompt, response_a, response_b))
        except self._openai.BadRequestError as err:  # e.g. a content filter: this pair's problem, not the run's
            logger.warning("judge request for pair %r refused: %s", pair_id, err.message)
            return record | {"error": err.message}
        except self._openai.APIError as err:  # retryable ones after max_retries; 401, 404 and the like at once
            raise RuntimeError(f"LLM judge request for pair {pair_id!r} failed ({type(err).__name__}: {err}); "
                               "the finished requests are cached, so a rerun resumes") from err
        choice = (response.get("choices") or [{}])[0]
        answer = (choice.get("message") or {}).get("content") or ""
        first = ((choice.get("logprobs") or {}).get("content") or [None])[0]
        top = [(t["token"], t["logprob"]) for t in first.get("top_logprobs") or []] if first else None
        verdict = self.template.parse(answer, top)
        usage = response.get("usage") or {}
        if not record["cached"]:
            record["usage"] = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        if verdict is None:
            return record | {"answer": answer, "finish_reason": choice.get("finish_reason")}
        return record | {"answer": answer, "finish_reason": choice.get("finish_reason"), "label": verdict.label,
                         "score_a": verdict.score}

    # -- many pairs -------------------------------------------------------------------------------

    def compare(
        self,
        prompts: Sequence[Prompt],
        policy_responses: Sequence[str],
        opponent_responses: Sequence[str],
        *,
        ids: Sequence[str] | None = None,
        out_dir: str | os.PathLike | None = None,
    ) -> JudgeReport:
        """Judge policy against opponent on each prompt; write ``out_dir/judgments.jsonl`` when ``out_dir`` is given.

        Args:
            prompts: what both responded to: strings, or conversations as chat messages (rendered as turns).
            policy_responses, opponent_responses: one response each per prompt.
            ids: a unique id per pair (default "0", "1", ...); it also seeds the single-order draw.
        """
        n = len(prompts)
        if not len(policy_responses) == len(opponent_responses) == n:
            raise ValueError(f"got {n} prompts, {len(policy_responses)} policy responses and "
                             f"{len(opponent_responses)} opponent responses; they must be paired")
        ids = [str(i) for i in (ids if ids is not None else range(n))]
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"ids must be {n} unique values, got {len(ids)} with {len(set(ids))} distinct")
        orders = [(True, False) if self.config.both_orders else
                  (random.Random(f"{self.config.seed}:{pair_id}").random() < 0.5,) for pair_id in ids]
        jobs = [(i, policy_first) for i in range(n) for policy_first in orders[i]]
        texts = [render_conversation(p) for p in prompts]
        records: list[dict[str, Any]] = [{}] * len(jobs)
        with (ThreadPoolExecutor(self.config.concurrency) as pool,
              tqdm(total=len(jobs), desc=f"judge {self.config.model}", disable=not self.config.progress) as bar):
            futures = {}
            for j, (i, policy_first) in enumerate(jobs):
                a, b = ((policy_responses[i], opponent_responses[i]) if policy_first
                        else (opponent_responses[i], policy_responses[i]))
                futures[pool.submit(self._judge, ids[i], texts[i], a, b)] = j
            try:
                for future in as_completed(futures):
                    records[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        judgments = [self._judgment(ids[i], prompts[i], policy_responses[i], opponent_responses[i], policy_first, r)
                     for (i, policy_first), r in zip(jobs, records, strict=True)]
        report = self._report(ids, judgments, policy_responses, opponent_responses)
        if out_dir is not None:
            write_text(Path(out_dir) / "judgments.jsonl", "".join(json.dumps(j) + "\n" for j in judgments))
        return report

    def _judgment(self, pair_id: str, prompt: Prompt, policy: str, opponent: str, policy_first: bool,
                  record: dict[str, Any]) -> dict[str, Any]:
        score_a = record["score_a"]
        policy_score = None if score_a is None else score_a if policy_first else 1.0 - score_a
        return {"id": pair_id, "policy": "A" if policy_first else "B", "prompt": prompt,
                "response_a": policy if policy_first else opponent, "response_b": opponent if policy_first else policy,
                "answer": record["answer"], "finish_reason": record["finish_reason"], "label": record["label"],
                "score_a": score_a,
                "policy_score": policy_score, "valid": score_a is not None, "error": record["error"],
                "usage": record["usage"], "cached": record["cached"], "model": self.config.model,
                "template": self.template.name}

    def _report(self, ids: list[str], judgments: list[dict[str, Any]], policy_responses: Sequence[str],
                opponent_responses: Sequence[str]) -> JudgeReport:
        by_pair: dict[str, list[float | None]] = {pair_id: [] for pair_id in ids}
        for j in judgments:
            by_pair[j["id"]].append(j["policy_score"])
        combined = [combine_orders(by_pair[pair_id]) for pair_id in ids]
        scores = [score for score, _ in combined]
        agree = [agreed for _, agreed in combined if agreed is not None]
        invalid_answers = sum(not j["valid"] for j in judgments)
        if invalid_answers:
            logger.warning("%d of %d judge answers could not be read (template %s); their pairs count as invalid, "
                           "see judgments.jsonl", invalid_answers, len(judgments), self.template.name)
        sent = [j for j in judgments if not j["cached"] and j["error"] is None]
        usage = {"prompt_tokens": sum(j["usage"]["prompt_tokens"] for j in judgments),
                 "completion_tokens": sum(j["usage"]["completion_tokens"] for j in judgments),
                 "requests": len(sent), "cached": sum(j["cached"] for j in judgments)}
        valid = any(s is not None for s in scores)
        lengths = [len(p) - len(o) for p, o in zip(policy_responses, opponent_responses, strict=True)]
        with self._lock:
            adjustments = sorted(self._refused)
        return JudgeReport(
            ids=ids, scores=scores, judgments=judgments,
            win_rate=judged_win_rate(scores) if valid else None,
            length_adjusted=length_adjusted_win_rate(scores, lengths) if valid else None,
            consistency=sum(agree) / len(agree) if self.config.both_orders and agree else None,
            invalid_answers=invalid_answers, usage=usage, adjustments=adjustments,
        )


def combine_orders(policy_scores: Sequence[float | None]) -> tuple[float | None, bool | None]:
    """One pair's score for the policy from its verdicts in each order asked, and whether two orders agreed.

    One order: that score, agreement None. Two orders: None when either is invalid; when both fall on the same
    side of 0.5 (both wins, both ties or both losses) their mean (for label verdicts, the verdict itself),
    else 0.5, a tie.
    """
    if len(policy_scores) == 1:
        return policy_scores[0], None
    first, second = policy_scores
    if first is None or second is None:
        return None, None
    if _side(first) == _side(second):
        return (first + second) / 2, True
    return 0.5, False


def refused_param(err: Exception, sent: dict[str, Any]) -> str | None:
    """The parameter a 400 error refuses, if it is one we sent and can do without: the error's ``param`` field,
    else the first of max_tokens, temperature, (top_)logprobs named as a word in its message. The logprobs pair
    counts as one name, "logprobs"."""
    droppable = [name for name in ("max_tokens", "temperature", "top_logprobs", "logprobs") if name in sent]
    param = getattr(err, "param", None)
    message = str(getattr(err, "message", err))
    name = param if param in droppable else next((n for n in droppable if re.search(rf"\b{n}\b", message)), None)
    return "logprobs" if name == "top_logprobs" else name


def _side(score: float) -> int:
    """+1 a win, 0 a tie, -1 a loss."""
    return (score > 0.5) - (score < 0.5)
