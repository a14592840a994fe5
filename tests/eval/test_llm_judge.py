"""The LLM judge against a fake chat-completions server (an httpx MockTransport): orders, parsing, retries, cache.

The fake server decides by looking at the request: prompts name the behaviour ("prefers-policy", "biased", ...)
and the policy's response is the one that contains "POLICY", so the server knows which position it holds.
"""

import importlib.resources
import importlib.util
import json
import math
import random
import sys
import threading
import time

import pytest
from conftest import needs

from logitsam.eval.llm_judge import (
    TEMPLATE_NAMES,
    JudgeTemplate,
    LLMJudge,
    LLMJudgeConfig,
    combine_orders,
    load_template,
    parse_alpaca_eval,
    parse_arena_hard,
    parse_label,
    parse_mt_bench,
    parse_template,
    render_conversation,
)

HAS_OPENAI = importlib.util.find_spec("openai") is not None
requires_openai = needs(HAS_OPENAI, "openai (pip install 'logitsam[judge]')")
if HAS_OPENAI:
    import openai

    # openai 3.x sends through httpx2, earlier versions through httpx
    httpx = __import__("httpx2" if int(openai.__version__.split(".")[0]) >= 3 else "httpx")

POLICY, OPPONENT = "POLICY answer", "OPPONENT answer"


def completion(content, top_logprobs=None, prompt_tokens=10, completion_tokens=3):
    """A chat-completion body; ``top_logprobs`` [(token, prob)] become the first token's top log-probs."""
    logprobs = None
    if top_logprobs is not None:
        top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top_logprobs]
        logprobs = {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "bytes": None,
                                 "top_logprobs": top}]}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "judge-model",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def error(status, message, param=None, code=None):
    return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                  "param": param, "code": code}})


class FakeServer:
    """Calls ``answer(body, call_number, request)`` for each request: a dict is a 200 completion, a Response is sent
    as is, an exception is raised (a timeout). Records every request body and its Authorization header."""

    def __init__(self, answer):
        self.answer, self.bodies, self.auth = answer, [], []
        self._lock = threading.Lock()

    def __call__(self, request):
        body = json.loads(request.content)
        with self._lock:
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
            call = len(self.bodies)
        out = self.answer(body, call, request)
        if isinstance(out, Exception):
            raise out
        return out if isinstance(out, httpx.Response) else httpx.Response(200, json=out)


def user_text(body):
    return body["messages"][-1]["content"]


def policy_is_a(body):
    text = user_text(body)
    return text.index(POLICY) < text.index(OPPONENT)


def make_judge(server, tmp_path, **overrides):
    config = LLMJudgeConfig(**{"model": "judge-model", "base_url": "http://judge.test/v1", "api_key": "sk-test",
                               "cache_dir": str(tmp_path / "cache"), "progress": False, "concurrency": 1,
                               **overrides})
    return LLMJudge(config, http_client=httpx.Client(transport=httpx.MockTransport(server)))


def mt_bench_answer(body, call, request):
    """prefers-policy / prefers-opponent follow the content; biased always says A; tie says C; garbage says nothing."""
    text = user_text(body)
    if "prefers-policy" in text:
        return completion("Policy is better. [[A]]" if policy_is_a(body) else "Policy is better. [[B]]")
    if "prefers-opponent" in text:
        return completion("[[B]]" if policy_is_a(body) else "[[A]]")
    if "biased" in text:
        return completion("The first one. [[A]]")
    if "tie" in text:
        return completion("Equally good: [[C]]")
    if "half-garbage" in text:
        return completion("[[A]]" if policy_is_a(body) else "I cannot decide.")
    if "filtered" in text:
        return error(400, "The prompt triggered the content management policy.", param="prompt", code="content_filter")
    return completion("I cannot decide between [[A]] and [[B]].")


# ---------------------------------------------------------------------------------------------------
# Templates and parsers (no server)


@pytest.mark.parametrize(
    ("name", "answer", "score", "label"),
    [
        ("dpo_dialogue", "Comparison: A answers the question.\nMore helpful: A", 1.0, "A"),
        ("dpo_dialogue", "Comparison: B is kinder.\n**More helpful:** \"B\"", 0.0, "B"),
        ("dpo_summary", "Comparison: B is concise.\nPreferred: B", 0.0, "B"),
        ("mt_bench_pair", "Both are fine, so [[C]]", 0.5, "tie"),
        ("arena_hard", "My final verdict is: [[B>>A]]", 0.0, "B>>A"),
        ("arena_hard", "[[A>B]]", 1.0, "A>B"),
        ("arena_hard", "Tie, relatively the same: [[A=B]]", 0.5, "A=B"),
        ("alpaca_eval", "m", 1.0, "A"),
        ("alpaca_eval", "M", 0.0, "B"),
    ],
)
def test_shipped_templates_render_and_parse(name, answer, score, label):
    template = load_template(name)
    messages = template.messages("the prompt", "first reply", "second reply")
    text = "\n".join(m["content"] for m in messages)
    assert "the prompt" in text and text.index("first reply") < text.index("second reply")
    assert "{response_a}" not in text and "{prompt}" not in text
    assert messages[-1]["role"] == "user"
    verdict = template.parse(answer)
    assert (verdict.score, verdict.label) == (score, label)
    assert template.parse("I refuse to choose.") is None


def test_every_shipped_template_names_its_protocol():
    for name in TEMPLATE_NAMES:
        template = load_template(name)
        assert isinstance(template, JudgeTemplate) and template.name == name
        text = (importlib.resources.files("logitsam.eval") / "templates" / f"{name}.txt").read_text()
        header = [line for line in text.splitlines() if line.startswith("#")]
        assert any("Follows" in line for line in header)
    assert load_template("alpaca_eval").uses_logprobs and load_template("alpaca_eval").max_tokens == 1


def test_parsers_need_agreeing_markers():
    assert parse_mt_bench("[[A]] ... final: [[A]]").score == 1.0
    assert parse_mt_bench("Not [[A]] but [[B]]") is None  # a clash is invalid (MT-Bench itself would say A)
    assert parse_arena_hard("[[A >> B]]").label == "A>>B"
    assert parse_arena_hard("[[A<B]]") is None  # not one of the five verdicts
    assert parse_label("More helpful: A\nMore helpful: B", "More helpful") is None
    assert parse_label("more helpful: B", "More helpful").score == 0.0
    assert parse_label("More helpful: a tie", "More helpful") is None  # the letter must be a capital A or B
    assert parse_label("Comparison: x", "More helpful") is None


def test_alpaca_eval_reads_the_first_token_probabilities():
    # P(m) = 0.6 (" m" and "m" both count), P(M) = 0.2: 0.6 / 0.8 = 0.75; other tokens are ignored
    top = [(t, math.log(p)) for t, p in [("m", 0.5), (" m", 0.1), ("M", 0.2), ("x", 0.2)]]
    verdict = parse_alpaca_eval("m", top)
    assert verdict.score == pytest.approx(0.75) and verdict.label == "A"
    assert parse_alpaca_eval("M", [("x", 0.0)]).score == 0.0  # no identifier among them: the text decides
    assert parse_alpaca_eval("a", None, tokens=("a", "b")).score == 1.0
    assert parse_alpaca_eval("maybe", None) is None


def test_user_template_with_regex_parser(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# My own judge.\n# parser: regex\n# verdict A: Winner:\\s*first\n# verdict B: Winner:\\s*second\n"
                    "# verdict tie: Winner:\\s*neither\n# max_tokens: 64\n"
                    "Q: {prompt}\nFirst: {response_a}\nSecond: {response_b}\n"
                    "End with 'Winner: first|second|neither'.\n")
    template = load_template(path)
    assert template.max_tokens == 64 and template.system == ""
    assert [m["role"] for m in template.messages("q", "a", "b")] == ["user"]
    assert template.parse("Winner: second").score == 0.0
    assert template.parse("Winner: neither").score == 0.5
    assert template.parse("Winner: first ... no, Winner: second") is None


def test_template_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="parser"):
        parse_template("Q: {prompt} {response_a} {response_b}", "t.txt")
    with pytest.raises(ValueError, match=r"\{response_b\}"):
        parse_template("# parser: mt_bench\n{prompt} {response_a}", "t.txt")
    with pytest.raises(ValueError, match="verdict B"):
        parse_template("# parser: regex\n# verdict A: x\n{prompt} {response_a} {response_b}", "t.txt")
    with pytest.raises(ValueError, match="label"):
        parse_template("# parser: label\n{prompt} {response_a} {response_b}", "t.txt")
    with pytest.raises(ValueError, match="neither a shipped template"):
        load_template(tmp_path / "missing.txt")


def test_placeholders_are_filled_once():
    template = load_template("mt_bench_pair")
    user = template.messages("p", "I write {response_b} literally", "B")[-1]["content"]
    assert "I write {response_b} literally" in user


def test_conversation_prompts_are_rendered_as_turns():
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "How do I boil an egg?"}]
    assert render_conversation(conversation) == "User: Hi\n\nAssistant: Hello\n\nUser: How do I boil an egg?"
    assert render_conversation("plain") == "plain"


def test_combine_orders():
    assert combine_orders([1.0, 1.0]) == (1.0, True)
    assert combine_orders([0.0, 0.0]) == (0.0, True)
    assert combine_orders([1.0, 0.0]) == (0.5, False)  # position bias: each order picked A
    assert combine_orders([0.5, 1.0]) == (0.5, False)
    assert combine_orders([0.5, 0.5]) == (0.5, True)
    assert combine_orders([1.0, None]) == (None, None)
    assert combine_orders([0.8, 0.6]) == (pytest.approx(0.7), True)
    assert combine_orders([0.0]) == (0.0, None)


# ---------------------------------------------------------------------------------------------------
# Against the fake server


@requires_openai
def test_both_orders_agreement_disagreement_and_judgments_file(tmp_path):
    server = FakeServer(mt_bench_answer)
    prompts = ["prefers-policy", "prefers-opponent", "biased"]
    with make_judge(server, tmp_path, template="mt_bench_pair", concurrency=3) as judge:
        report = judge.compare(prompts, [POLICY] * 3, [OPPONENT + "!!"] * 3, ids=["p", "o", "b"], out_dir=tmp_path)
    assert report.scores == [1.0, 0.0, 0.5]
    assert report.consistency == pytest.approx(2 / 3)
    rate = report.win_rate
    assert (rate["wins"], rate["ties"], rate["losses"], rate["invalid"], rate["n"]) == (1, 1, 1, 0, 3)
    assert rate["win_rate"] == 0.5
    assert report.usage == {"prompt_tokens": 60, "completion_tokens": 18, "requests": 6, "cached": 0}
    assert len(server.bodies) == 6
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 1024 and "logprobs" not in b for b in server.bodies)
    lines = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and [x["id"] for x in lines] == ["p", "p", "o", "o", "b", "b"]
    first, second = lines[4], lines[5]  # the biased pair: A=policy, then A=opponent
    assert (first["policy"], first["response_a"], first["response_b"]) == ("A", POLICY, OPPONENT + "!!")
    assert (second["policy"], second["response_a"], second["response_b"]) == ("B", OPPONENT + "!!", POLICY)
    assert first["answer"] == second["answer"] == "The first one. [[A]]"
    assert (first["label"], first["score_a"], first["policy_score"]) == ("A", 1.0, 1.0)
    assert (second["label"], second["score_a"], second["policy_score"]) == ("A", 1.0, 0.0)
    assert first["prompt"] == "biased" and first["valid"] and not first["cached"] and first["error"] is None
    assert first["finish_reason"] == "stop"
    assert first["usage"] == {"prompt_tokens": 10, "completion_tokens": 3} and first["template"] == "mt_bench_pair"
    summary = report.summary()
    assert summary["win_rate"] == 0.5 and summary["consistency"] == pytest.approx(2 / 3)
    assert summary["length_adjusted_win_rate"] == pytest.approx(0.5, abs=1e-6)  # lengths all differ by -2


@requires_openai
def test_ties_and_unreadable_answers_are_counted_not_dropped(tmp_path, caplog):
    server = FakeServer(mt_bench_answer)
    prompts = ["tie", "garbage", "half-garbage", "filtered", "prefers-opponent"]
    with make_judge(server, tmp_path, template="mt_bench_pair") as judge:
        report = judge.compare(prompts, [POLICY] * 5, [OPPONENT] * 5)
    assert report.scores == [0.5, None, None, None, 0.0]
    rate = report.win_rate
    assert (rate["wins"], rate["ties"], rate["losses"], rate["invalid"], rate["n"]) == (0, 1, 1, 3, 2)
    assert rate["win_rate"] == 0.25  # invalid pairs are not losses
    assert report.invalid_answers == 2 + 1 + 2  # garbage twice, half-garbage once, filtered twice
    assert report.consistency == 1.0  # tie/tie and loss/loss agree; pairs with an invalid order are left out
    filtered = [j for j in report.judgments if j["prompt"] == "filtered"]
    assert all("400 - The prompt triggered" in j["error"] and not j["valid"] for j in filtered)
    assert report.usage["requests"] == 8  # the two refused requests are not counted as sent
    assert "could not be read" in caplog.text


@requires_openai
def test_single_order_is_drawn_per_pair_from_the_seed(tmp_path):
    server = FakeServer(mt_bench_answer)
    ids = [f"pair-{i}" for i in range(12)]
    with make_judge(server, tmp_path, template="mt_bench_pair", both_orders=False, seed=3) as judge:
        report = judge.compare([f"prefers-policy {i}" for i in ids], [POLICY] * 12, [OPPONENT] * 12, ids=ids)
    assert len(server.bodies) == 12 and report.consistency is None
    assert report.scores == [1.0] * 12
    expected = ["A" if random.Random(f"3:{i}").random() < 0.5 else "B" for i in ids]
    assert [j["policy"] for j in report.judgments] == expected
    assert {"A", "B"} == set(expected)  # this seed puts the policy in both positions
    assert [policy_is_a(b) for b in server.bodies] == [p == "A" for p in expected]


@requires_openai
def test_rate_limit_and_server_errors_are_retried_with_exponential_backoff(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    server = FakeServer(lambda body, call, request: error(429, "Rate limit reached") if call == 1
                        else completion("[[A]]" if policy_is_a(body) else "[[B]]"))
    with make_judge(server, tmp_path / "a", template="mt_bench_pair", both_orders=False) as judge:
        report = judge.compare(["q"], [POLICY], [OPPONENT])
    assert len(server.bodies) == 2 and report.scores == [1.0]
    assert len(sleeps) == 1 and 0.375 <= sleeps[0] <= 0.5  # 0.5 s less up to 25 % jitter
    assert report.usage["requests"] == 1 and report.usage["prompt_tokens"] == 10

    sleeps.clear()
    server = FakeServer(lambda body, call, request: error(503, "overloaded") if call <= 2 else completion("[[C]]"))
    with make_judge(server, tmp_path / "b", template="mt_bench_pair", both_orders=False, max_retries=2) as judge:
        assert judge.compare(["q"], [POLICY], [OPPONENT]).scores == [0.5]
    assert len(server.bodies) == 3 and len(sleeps) == 2
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0  # the wait doubles

    sleeps.clear()
    server = FakeServer(lambda body, call, request: error(500, "broken"))
    with make_judge(server, tmp_path / "c", template="mt_bench_pair", both_orders=False, max_retries=1) as judge:
        with pytest.raises(RuntimeError, match="pair 'only'.*InternalServerError"):
            judge.compare(["q"], [POLICY], [OPPONENT], ids=["only"])
    assert len(server.bodies) == 2 and len(sleeps) == 1  # max_retries=1: one retry, then the error


@requires_openai
def test_timeout_is_retried(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)

    def answer(body, call, request):
        if call == 1:
            return httpx.ReadTimeout("the judge took too long", request=request)
        return completion("[[A]]" if policy_is_a(body) else "[[B]]")

    server = FakeServer(answer)
    with make_judge(server, tmp_path, template="mt_bench_pair") as judge:
        report = judge.compare(["q"], [POLICY], [OPPONENT])
    assert report.scores == [1.0] and len(server.bodies) == 3 and len(sleeps) == 1


@requires_openai
def test_rerun_reads_the_cache_and_does_not_count_usage_twice(tmp_path):
    server = FakeServer(mt_bench_answer)
    args = (["prefers-policy", "prefers-opponent"], [POLICY] * 2, [OPPONENT] * 2)
    with make_judge(server, tmp_path, template="mt_bench_pair") as judge:
        first = judge.compare(*args)
    assert len(server.bodies) == 4 and first.usage["prompt_tokens"] == 40
    with make_judge(server, tmp_path, template="mt_bench_pair") as judge:  # a new process, same cache
        again = judge.compare(*args, out_dir=tmp_path / "out")
    assert len(server.bodies) == 4  # no second HTTP call
    assert again.scores == first.scores == [1.0, 0.0]
    assert again.usage == {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cached": 4}
    lines = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert all(x["cached"] and x["usage"]["prompt_tokens"] == 0 for x in lines)
    with make_judge(server, tmp_path, template="mt_bench_pair", temperature=0.7) as judge:  # other params: other key
        judge.compare(*args)
    assert len(server.bodies) == 8
    with make_judge(server, tmp_path, template="mt_bench_pair", use_cache=False) as judge:
        judge.compare(*args)
    assert len(server.bodies) == 12


@requires_openai
def test_reasoning_model_refusals_are_dropped_once_and_remembered(tmp_path, caplog):
    def answer(body, call, request):
        if "temperature" in body:
            return error(400, "Unsupported value: 'temperature' does not support 0 with this model. Only the "
                         "default (1) value is supported.", param="temperature", code="unsupported_value")
        if "max_tokens" in body:
            return error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                         "'max_completion_tokens' instead.", param="max_tokens", code="unsupported_parameter")
        return completion("Comparison: x\nMore helpful: " + ("A" if policy_is_a(body) else "B"))

    server = FakeServer(answer)
    with make_judge(server, tmp_path, template="dpo_dialogue") as judge:
        report = judge.compare(["q1", "q2", "q3"], [POLICY] * 3, [OPPONENT] * 3)
    assert report.scores == [1.0, 1.0, 1.0]
    assert len(server.bodies) == 2 + 6  # the first request is refused twice, then nothing is refused
    assert "temperature" in server.bodies[0] and "max_tokens" in server.bodies[1]
    assert all("temperature" not in b and "max_tokens" not in b and b["max_completion_tokens"] == 256
               for b in server.bodies[2:])
    assert report.adjustments == ["max_tokens", "temperature"]
    assert "refused 'temperature'" in caplog.text and "max_completion_tokens instead" in caplog.text
    assert report.usage["requests"] == 6


@requires_openai
def test_alpaca_eval_uses_logprobs_and_falls_back_to_text(tmp_path):
    def answer(body, call, request):
        if "text-only" in user_text(body):
            return completion("M" if policy_is_a(body) else "m")  # the opponent wins, no logprobs returned
        if policy_is_a(body):
            return completion("m", top_logprobs=[("m", 0.8), ("M", 0.2)])
        return completion("M", top_logprobs=[(" M", 0.6), ("m", 0.3), ("x", 0.1)])

    server = FakeServer(answer)
    with make_judge(server, tmp_path, template="alpaca_eval") as judge:
        report = judge.compare(["with-logprobs", "text-only"], [POLICY] * 2, [OPPONENT] * 2)
    assert all(b["logprobs"] is True and b["top_logprobs"] == 5 and b["max_tokens"] == 1 for b in server.bodies)
    # policy as A: P(m) = 0.8 -> 0.8; policy as B: P(M) / (P(m) + P(M)) = 0.6 / 0.9 -> 2/3; both favour the policy
    assert report.scores[0] == pytest.approx((0.8 + 2 / 3) / 2)
    assert report.scores[1] == 0.0
    assert [j["score_a"] for j in report.judgments[:2]] == pytest.approx([0.8, 1 / 3])
    assert report.win_rate["win_rate"] == pytest.approx((0.8 + 2 / 3) / 4)


@requires_openai
def test_server_without_logprobs_is_read_from_text(tmp_path):
    def answer(body, call, request):
        if body.get("logprobs"):
            return error(400, "logprobs is not supported by this server")
        return completion("m" if policy_is_a(body) else "M")

    server = FakeServer(answer)
    with make_judge(server, tmp_path, template="alpaca_eval") as judge:
        report = judge.compare(["q"], [POLICY], [OPPONENT])
    assert report.scores == [1.0] and report.adjustments == ["logprobs"]
    assert len(server.bodies) == 3 and all("top_logprobs" not in b for b in server.bodies[1:])


@requires_openai
def test_keys_and_local_servers(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        LLMJudge(LLMJudgeConfig(model="judge-model"))
    server = FakeServer(mt_bench_answer)
    with make_judge(server, tmp_path, template="mt_bench_pair", api_key=None) as judge:
        judge.compare(["tie"], [POLICY], [OPPONENT])
    assert server.auth[0] == "Bearer EMPTY"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with make_judge(server, tmp_path, template="mt_bench_pair", api_key=None, use_cache=False) as judge:
        judge.compare(["tie"], [POLICY], [OPPONENT])
    assert server.auth[-1] == "Bearer sk-from-env"


def test_config_and_input_validation(tmp_path):
    with pytest.raises(ValueError, match="concurrency=0"):
        LLMJudgeConfig(model="m", concurrency=0)
    with pytest.raises(ValueError, match="max_retries"):
        LLMJudgeConfig(model="m", max_retries=-1)
    if HAS_OPENAI:
        with LLMJudge(LLMJudgeConfig(model="m", api_key="k", cache_dir=str(tmp_path))) as judge:
            with pytest.raises(ValueError, match="paired"):
                judge.compare(["a", "b"], [POLICY], [OPPONENT, OPPONENT])
            with pytest.raises(ValueError, match="unique"):
                judge.compare(["a", "b"], [POLICY] * 2, [OPPONENT] * 2, ids=["x", "x"])


def test_missing_openai_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'logitsam\[judge\]'"):
        LLMJudge(LLMJudgeConfig(model="m", api_key="k"))
