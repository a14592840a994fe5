"""`logitsam eval --judge llm:MODEL` through the real CLI, against a fake chat-completions server.

The fake server (an httpx ``MockTransport``, handed to the judge through ``logitsam.eval.run._HTTP_CLIENT_FACTORY``)
reads the two responses out of the dpo_dialogue prompt and answers by a rule the test can apply by hand:

- a prompt with "garbage": an answer without a verdict (invalid);
- a prompt with "biased": always "More helpful: A" (a position bias: the two orders disagree, a tie);
- otherwise the response that sorts first as a string wins ("A" when the two are equal).

So with the policy's response p and the opponent's o, a pair's outcome is 1 if p < o, 0 if p > o, 0.5 if they are
equal or the prompt is "biased", and invalid for "garbage"; the win rate is the mean of the valid outcomes.
"""

import importlib.util
import json
import re
import sys
import threading

import datasets
import pytest
import transformers
from conftest import cli_error_line, make_tiny_llama, make_tiny_tokenizer, needs

from logitsam.cli import main
from logitsam.eval import run as eval_run
from logitsam.eval.stats import wilson_interval

HAS_OPENAI = importlib.util.find_spec("openai") is not None
pytestmark = needs(HAS_OPENAI, "openai (pip install 'logitsam[judge]')")
if HAS_OPENAI:
    import openai

    # openai 3.x sends through httpx2, earlier versions through httpx
    httpx = __import__("httpx2" if int(openai.__version__.split(".")[0]) >= 3 else "httpx")

# as in tests/test_cli_errors.py: bind the libraries' log handlers to the session's stderr, not one test's capsys
transformers.utils.logging.get_logger("transformers")
datasets.utils.logging.get_logger("datasets")

PROMPTS = ["Tell me 0:", "Tell me 1:", "biased 2:", "Tell me 3:", "garbage 4:"]
CHOSEN = [f" chosen reply {i}" for i in range(len(PROMPTS))]
USER = re.compile(r"Conversation:\n(.*)\n\nResponse A:\n(.*)\n\nResponse B:\n(.*)\n\nFirst write", re.S)


class FakeJudge:
    """The rule in the module docstring; records each request body and its Authorization header."""

    def __init__(self, status=200):
        self.status, self.bodies, self.auth = status, [], []
        self._lock = threading.Lock()

    def __call__(self, request):
        body = json.loads(request.content)
        with self._lock:
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "Incorrect API key provided",
                                                               "type": "invalid_request_error"}})
        prompt, a, b = USER.search(body["messages"][-1]["content"]).groups()
        if "garbage" in prompt:
            answer = "Both replies are hard to read."
        else:
            answer = "Comparison: one is better.\nMore helpful: " + ("A" if "biased" in prompt or a <= b else "B")
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

    def seen(self, text):
        return any(text in body["messages"][-1]["content"] for body in self.bodies)


def expected_outcome(prompt, policy, opponent):
    if "garbage" in prompt:
        return None
    if "biased" in prompt or policy == opponent:
        return 0.5
    return 1.0 if policy < opponent else 0.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two untied tiny models: tied ones this small repeat the prompt's last character, both alike."""
    root = tmp_path_factory.mktemp("models")
    tok = make_tiny_tokenizer()
    dirs = []
    for seed in (0, 1):
        make_tiny_llama(vocab_size=len(tok), seed=seed).save_pretrained(root / f"m{seed}")
        tok.save_pretrained(root / f"m{seed}")
        dirs.append(root / f"m{seed}")
    return dirs


@pytest.fixture
def pairs(tmp_path):
    rows = [{"prompt": p, "chosen": c, "rejected": f" rejected reply {i}"}
            for i, (p, c) in enumerate(zip(PROMPTS, CHOSEN, strict=True))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A FakeJudge behind the judge's HTTP client; no real key or server in the environment."""
    server = FakeJudge()
    monkeypatch.setattr(eval_run, "_HTTP_CLIENT_FACTORY",
                        lambda: httpx.Client(transport=httpx.MockTransport(server)))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    return server


def eval_argv(models, pairs, out, *extra):
    policy, reference = models
    return ["eval", "--model", policy, "--ref_model", reference, "--dataset_name", pairs, "--split", "train",
            "--max_length", "48", "--max_prompt_length", "24", "--num_prompts", len(PROMPTS), "--max_new_tokens", "6",
            "--temperature", "0", "--device", "cpu", "--judge_base_url", "http://judge.test/v1",
            "--judge_concurrency", "2", "--output_dir", out, *extra]


def run_eval(argv):
    main([str(a) for a in argv])
    out = argv[argv.index("--output_dir") + 1]
    results = json.loads((out / "eval_results.json").read_text())
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    return results, samples, judgments


def check_win_rate(results, name, prompts, policy, opponent):
    """The numbers in eval_results.json against the rule applied by hand to the texts the judge saw."""
    outcomes = [expected_outcome(*x) for x in zip(prompts, policy, opponent, strict=True)]
    valid = [o for o in outcomes if o is not None]
    assert any(o != 0.5 for o in valid)  # not all ties, so a verdict read the wrong way round would show
    assert results[f"winrate/{name}/win_rate"] == pytest.approx(sum(valid) / len(valid))
    low, high = wilson_interval(sum(valid), len(valid))
    assert (results[f"winrate/{name}/ci_low"], results[f"winrate/{name}/ci_high"]) == pytest.approx((low, high))
    counts = {"wins": sum(o > 0.5 for o in valid), "ties": sum(o == 0.5 for o in valid),
              "losses": sum(o < 0.5 for o in valid), "invalid": len(outcomes) - len(valid), "n": len(valid)}
    assert {k: results[f"winrate/{name}/{k}"] for k in counts} == counts
    return outcomes


# ---------------------------------------------------------------------------------------------------
# Against the reference, chosen, and a previous run's samples


def test_llm_judge_against_the_reference_with_vader(models, pairs, fake, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = eval_argv(models, pairs, out, "--judge", "vader", "--judge", "llm:fake", "--judge_api_key", "sk-secret-9")
    results, samples, judgments = run_eval(argv)
    name = "llm:fake"
    assert [s["prompt"] for s in samples] == PROMPTS
    outcomes = check_win_rate(results, name, PROMPTS, [s["policy"] for s in samples],
                              [s["reference"] for s in samples])
    assert [s[f"{name}_outcome"] for s in samples] == outcomes
    assert "winrate/vader/win_rate" in results  # combinable with the other judges, on the same samples
    # both orders: 2 requests a pair, the policy first as A then as B; "biased" disagrees, "garbage" is invalid
    assert len(judgments) == 2 * len(PROMPTS)
    assert [(j["id"], j["policy"]) for j in judgments] == [(str(i), side) for i in range(5) for side in "AB"]
    assert [j["response_a"] for j in judgments[::2]] == [j["response_b"] for j in judgments[1::2]] == \
        [s["policy"] for s in samples]
    agree = [o != 0.5 for o in outcomes if o is not None]
    assert results[f"winrate/{name}/consistency"] == pytest.approx(sum(agree) / len(agree))
    assert results[f"winrate/{name}/invalid_answers"] == 2
    assert 0 <= results[f"winrate/{name}/length_adjusted_win_rate"] <= 1
    assert (results[f"winrate/{name}/opponent"], results[f"winrate/{name}/template"],
            results[f"winrate/{name}/orders"]) == ("reference", "dpo_dialogue", "both")
    # the fake reports 10 prompt and 3 completion tokens a request
    usage = {k: results[f"winrate/{name}/{k}"] for k in ("requests", "cached", "prompt_tokens", "completion_tokens")}
    assert usage == {"requests": 10, "cached": 0, "prompt_tokens": 100, "completion_tokens": 30}
    assert len(fake.bodies) == 10
    assert "judge llm:fake: 10 requests sent (0 answered from the cache), 100 prompt + 30 completion tokens" in \
        capsys.readouterr().out
    # the key reaches the server and no file
    assert set(fake.auth) == {"Bearer sk-secret-9"}
    assert not any("sk-secret-9" in f.read_text() for f in out.iterdir() if f.is_file())

    main([str(a) for a in argv])  # the rerun is answered from the request cache
    again = json.loads((out / "eval_results.json").read_text())
    assert (again[f"winrate/{name}/requests"], again[f"winrate/{name}/cached"]) == (0, 10)
    assert again[f"winrate/{name}/win_rate"] == results[f"winrate/{name}/win_rate"]
    main([str(a) for a in [*argv, "--no_judge_cache"]])
    assert json.loads((out / "eval_results.json").read_text())[f"winrate/{name}/requests"] == 10


def test_llm_judge_against_chosen_in_one_random_order(models, pairs, fake, tmp_path):
    out = tmp_path / "eval"
    argv = eval_argv(models, pairs, out, "--judge", "llm:fake", "--judge_against", "chosen", "--judge_orders",
                     "random", "--seed", "3")
    results, samples, judgments = run_eval(argv)
    assert [s["opponent"] for s in samples] == CHOSEN and all("reference" not in s for s in samples)
    assert all(fake.seen(chosen) for chosen in CHOSEN)  # the dataset's chosen texts reached the judge
    outcomes = [expected_outcome(*x) for x in zip(PROMPTS, [s["policy"] for s in samples], CHOSEN, strict=True)]
    # one order a pair: "biased" is a win or a loss, by the side it was drawn on
    biased = next(j for j in judgments if j["prompt"] == "biased 2:")
    outcomes[2] = 1.0 if biased["policy"] == "A" else 0.0
    valid = [o for o in outcomes if o is not None]
    assert results["winrate/llm:fake/win_rate"] == pytest.approx(sum(valid) / len(valid))
    assert len(judgments) == len(PROMPTS) == len(fake.bodies)
    assert results["winrate/llm:fake/consistency"] is None
    assert (results["winrate/llm:fake/opponent"], results["winrate/llm:fake/orders"]) == ("chosen", "random")


def test_llm_judge_against_a_previous_runs_samples(models, pairs, fake, tmp_path):
    """Run 1 (policy m0) leaves its samples; run 2 (policy m1) is judged against m0's responses, read by prompt
    from eval_samples.jsonl and then from judgments.jsonl."""
    first = tmp_path / "first"
    _, samples1, _ = run_eval(eval_argv(models, pairs, first, "--judge", "llm:fake"))
    previous = {s["prompt"]: s["policy"] for s in samples1}
    for source in (first / "eval_samples.jsonl", first / "judgments.jsonl"):
        fake.bodies.clear()
        out = tmp_path / source.stem
        # no cache: run 1 asked the same pairs (m0 vs m1) in the other order
        argv = eval_argv(models[::-1], pairs, out, "--judge", "llm:fake", "--judge_against", source, "--no_judge_cache")
        results, samples, _ = run_eval(argv)
        assert [s["opponent"] for s in samples] == [previous[p] for p in PROMPTS]
        assert all(fake.seen(previous[p]) for p in PROMPTS)
        check_win_rate(results, "llm:fake", PROMPTS, [s["policy"] for s in samples], [previous[p] for p in PROMPTS])
        assert results["winrate/llm:fake/opponent"] == str(source)


# ---------------------------------------------------------------------------------------------------
# Mistakes: one line naming the flag, value or file; exit 2; no model loaded


fails = cli_error_line


def never_loaded(pairs, *extra):
    return ["eval", "--model", "never-loaded", "--dataset_name", pairs, "--split", "train", "--judge", "llm:fake",
            "--judge_base_url", "http://judge.test/v1", *extra]


def test_template_mistakes(pairs, fake, tmp_path, capsys):
    line = fails(never_loaded(pairs, "--judge_template", "dpo"), capsys)
    assert line == ("logitsam eval: error: --judge_template dpo: judge template 'dpo' is neither a shipped template "
                    "(dpo_dialogue, dpo_summary, mt_bench_pair, arena_hard, alpaca_eval) nor a file")
    missing = tmp_path / "mine.txt"
    assert f"--judge_template {missing}: judge template '{missing}' is neither" in \
        fails(never_loaded(pairs, "--judge_template", missing), capsys)
    malformed = tmp_path / "malformed.txt"
    malformed.write_text("# parser: label\n[user]\n{prompt} {response_a} {response_b}\n")
    assert fails(never_loaded(pairs, "--judge_template", malformed), capsys).endswith(
        f"judge template {malformed}: the label parser needs a '# label: <name>' line")


def test_openai_missing_and_no_key(pairs, fake, monkeypatch, capsys):
    argv = ["eval", "--model", "never-loaded", "--dataset_name", pairs, "--judge", "llm:gpt-4o-mini"]
    assert fails(argv, capsys) == ("logitsam eval: error: --judge llm:gpt-4o-mini needs an API key: set "
                                   "OPENAI_API_KEY (or --judge_api_key), or point --judge_base_url at a local "
                                   "OpenAI-compatible server")
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    assert fails(argv, capsys) == ("logitsam eval: error: --judge llm:gpt-4o-mini needs the OpenAI client: "
                                   "pip install 'logitsam[judge]'")


def test_opponent_mistakes(pairs, fake, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me 0:"}\n')
    line = fails(never_loaded(pairs, "--judge_against", "chosen", "--prompts_file", prompts), capsys)
    assert line == (f"logitsam eval: error: --judge_against chosen compares with the dataset's chosen responses, "
                    f"but --prompts_file {prompts} holds prompts only; drop --prompts_file to judge the dataset's "
                    "prompts")
    line = fails(never_loaded(pairs, "--judge_against", tmp_path / "gone.jsonl"), capsys)
    assert line == (f"logitsam eval: error: --judge_against {tmp_path / 'gone.jsonl'}: not reference, chosen or a "
                    "samples file (no such file)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Tell me 0:", "policy": "x"}\n{"text": "no prompt"}\n')
    assert fails(never_loaded(pairs, "--judge_against", bad), capsys).startswith(
        f"logitsam eval: error: {bad}: line 2: expected a 'prompt' and the policy's response")


def test_a_prompt_missing_from_the_samples_file_is_named(models, pairs, fake, tmp_path, capsys):
    """Matched once the data is read (the models are loaded by then), before any sampling or judging."""
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "Tell me 0:", "policy": "x"}\n{"prompt": "Something else", "policy": "y"}\n')
    line = fails(eval_argv(models, pairs, tmp_path / "eval", "--judge", "llm:fake", "--judge_against", other), capsys)
    assert line.startswith(f"logitsam eval: error: {other}: no sample for judged prompt 1, 'Tell me 1:'; ")
    assert not fake.bodies and not (tmp_path / "eval").exists()


def test_judge_flags_need_an_llm_judge(pairs, capsys):
    argv = ["eval", "--model", "never-loaded", "--dataset_name", pairs, "--judge_orders", "random"]
    line = fails(argv, capsys)
    assert line == "logitsam eval: error: --judge_orders random needs an LLM judge: add --judge llm:MODEL"
    line = fails(["eval", "--model", "m", "--dataset_name", pairs, "--judge_api_key", "sk-secret-9"], capsys)
    assert line == "logitsam eval: error: --judge_api_key needs an LLM judge: add --judge llm:MODEL"  # no key shown
    line = fails(["eval", "--model", "m", "--dataset_name", pairs, "--judge", "llm:"], capsys)
    assert "argument --judge: 'llm:' is not 'vader' or 'reward:MODEL'" in line


def test_a_refused_request_ends_in_one_line(models, pairs, fake, tmp_path, capsys):
    fake.status = 401
    line = fails(eval_argv(models, pairs, tmp_path / "eval", "--judge", "llm:fake", "--judge_against", "chosen"),
                 capsys)
    assert line.startswith("logitsam eval: error: --judge: LLM judge request for pair")
    assert "AuthenticationError" in line and "Incorrect API key provided" in line
