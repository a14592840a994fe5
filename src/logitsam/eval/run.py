"""`logitsam eval`: a checkpoint (or the initial model) against a reference on held-out pairs.

Three groups of numbers, written flat to ``eval_results.json``:
- ``eval/*``: implicit-reward preference accuracy, margin and loss on held-out pairs;
- ``shift/*``: held-out log-prob shifts vs the reference (the squeeze diagnostics, unperturbed head);
- ``winrate/<judge>/*``: judged generations of policy vs reference with a confidence interval, their sampling
  settings under ``generation``; an ``llm:MODEL`` judge (``logitsam.eval.llm_judge``) compares the policy with
  ``judge_against``: the reference's samples, the dataset's chosen responses, or a previous run's samples file,
  and writes every request to ``judgments.jsonl``;
- ``flatness/*``: Hutchinson estimate of the parameter-Hessian trace of the preference loss, and the
  closed-form logit-Hessian trace.

With ``export``, the policy also answers a benchmark's questions in the official tool's format
(``logitsam.eval.export``); ``export`` records the file, the sampling settings and samples per second.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .._atomic import write_json, write_text
from ..core import HeadOutput, sequence_logps, shift_labels
from ..core.head import STAT_NAMES
from ..core.head_chunked import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE
from ..core.losses import preference_loss
from ..data import DataError, PreferenceCollator, build_preference_dataset, load_preference_examples
from ..diagnostics import hutchinson_trace, squeeze_metrics
from ..models import check_linear_head, forward_hidden, lm_head_of, load_model, load_tokenizer
from .export import check_chat_template, default_model_id, export_answers, questions_from_prompts
from .generate import generate_responses, generation_settings
from .judges import make_judge
from .llm_judge import JudgeReport, LLMJudge, LLMJudgeConfig, render_conversation
from .stats import win_rate

logger = logging.getLogger("logitsam.eval")

OPPONENTS = ("reference", "chosen")  # judge_against: these, or the path of a previous run's samples file

# Test seam: a callable returning the httpx client the LLM judges send through (tests return one on an
# ``httpx.MockTransport`` fake server); None lets the openai client make its own.
_HTTP_CLIENT_FACTORY: Callable[[], Any] | None = None


def run_reference_of(checkpoint: str | Path) -> tuple[str | None, str | None]:
    """The reference a logitsam run trained against, and the config key it came from; (None, None) outside a run.

    From the run's ``logitsam_config.yaml`` (in ``checkpoint`` or, for ``checkpoint-N/``, its parent):
    ``ref_model_name_or_path`` when the run set one, else ``model_name_or_path``, the initial policy.
    """
    for path in (Path(checkpoint) / "logitsam_config.yaml", Path(checkpoint).parent / "logitsam_config.yaml"):
        if path.exists():
            config = yaml.safe_load(path.read_text()) or {}
            for key in ("ref_model_name_or_path", "model_name_or_path"):
                if config.get(key):
                    return str(config[key]), f"{path}: {key}"
    return None, None


def default_device() -> str:
    """Where `logitsam eval` runs without --device: "cuda" when there is a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# `sam_chunk_size: auto` picks the chunked head when one batch's fp32 logits would exceed this; the same rule and
# budget as training (``logitsam.train.run.resolve_chunk_size``; eval may not import train, a test keeps them equal)
LOGITS_BUDGET_BYTES = 1 << 30


def resolve_chunk_size(chunk_size: int | str | None, *, tokens: int, vocab_size: int,
                       budget_bytes: int = LOGITS_BUDGET_BYTES) -> int | None:
    """``sam_chunk_size`` as the head takes it: an int (chunked) or None (dense); "auto" is chunked
    (``DEFAULT_CHUNK_SIZE`` tokens per chunk) when ``tokens x vocab_size x 4`` bytes exceed ``budget_bytes``."""
    if chunk_size != "auto":
        return chunk_size
    return DEFAULT_CHUNK_SIZE if tokens * vocab_size * 4 > budget_bytes else None


def head_description(chunk_size: int | None, vocab_chunk_size: int | None) -> str:
    """The LM-head path as `eval_results.json` records it (a string, so reports do not read it as a metric)."""
    if chunk_size is None:
        return "dense"
    return f"chunked: sam_chunk_size={chunk_size}, sam_vocab_chunk_size={vocab_chunk_size}"


def _batches(dataset, batch_size, pad_token_id):
    collate = PreferenceCollator(pad_token_id)
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _concat(outputs: list[HeadOutput]) -> HeadOutput:
    """Batches of (chosen rows, rejected rows) -> one HeadOutput, all chosen rows first."""
    def cat(name):
        if getattr(outputs[0], name) is None:
            return None
        chosen = [getattr(o, name)[: o.num_pairs] for o in outputs]
        rejected = [getattr(o, name)[o.num_pairs:] for o in outputs]
        return torch.cat(chosen + rejected)

    names = ("logps", "lengths", *STAT_NAMES)
    values = {n: cat(n) for n in names}
    return HeadOutput(token_logps=values["logps"][:, None], vocab_size=outputs[0].vocab_size, **values)


@torch.no_grad()
def pair_outputs(model, dataset, *, pad_token_id, batch_size=8, chunk_size=None,
                 vocab_chunk_size=DEFAULT_VOCAB_CHUNK_SIZE, desc="log-probs") -> HeadOutput:
    """Unperturbed head pass with statistics over every pair of ``dataset`` (chosen rows first).

    ``chunk_size`` None: the dense head ((n, V) logits); an int: the chunked head, ``chunk_size`` tokens by
    ``vocab_chunk_size`` vocabulary entries at a time, with the same numbers.
    """
    device = next(model.parameters()).device
    model.eval()
    outputs = []
    for batch in tqdm(list(_batches(dataset, batch_size, pad_token_id)), desc=desc, unit="batch"):
        hidden = forward_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out = sequence_logps(hidden, lm_head_of(model), shift_labels(batch["labels"]).to(device), chunk_size=chunk_size,
                             vocab_chunk_size=vocab_chunk_size)
        outputs.append(out.detach())
    return _concat(outputs)


def preference_metrics(policy: HeadOutput, ref: HeadOutput | None, loss_type, beta, loss_params) -> dict:
    losses, chosen, rejected = preference_loss(
        loss_type, policy.chosen_logps, policy.rejected_logps,
        None if ref is None else ref.chosen_logps, None if ref is None else ref.rejected_logps,
        beta=beta, chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
        **(loss_params or {}),
    )
    return {
        "eval/loss": float(losses.mean()),
        "eval/preference_accuracy": float((chosen > rejected).float().mean()),
        "eval/margin": float((chosen - rejected).mean()),
        "eval/chosen_reward": float(chosen.mean()),
        "eval/rejected_reward": float(rejected.mean()),
        "eval/num_pairs": policy.num_pairs,
    }


def hessian_trace_of_loss(model, dataset, *, pad_token_id, ref: HeadOutput | None, loss_type, beta, loss_params,
                          batch_size, num_batches, num_probes, seed, head_only=False) -> tuple[float, float]:
    """Hutchinson estimate of tr(d^2 L / d theta^2) of the preference loss, averaged over batches.

    Always through the dense head: the chunked head has no second derivative.
    """
    device = next(model.parameters()).device
    params = [p for p in (lm_head_of(model).parameters() if head_only else model.parameters()) if p.requires_grad]
    estimates, variances = [], []
    model.eval()
    for b, batch in enumerate(_batches(dataset, batch_size, pad_token_id)):
        if b >= num_batches:
            break
        lo, hi = b * batch_size, b * batch_size + batch["input_ids"].shape[0] // 2
        ref_c = None if ref is None else ref.chosen_logps[lo:hi].to(device)
        ref_r = None if ref is None else ref.rejected_logps[lo:hi].to(device)

        def loss_fn(batch=batch, ref_c=ref_c, ref_r=ref_r):
            hidden = forward_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out = sequence_logps(hidden, lm_head_of(model), shift_labels(batch["labels"]).to(device),
                                 with_stats=False)
            losses, _, _ = preference_loss(loss_type, out.chosen_logps, out.rejected_logps, ref_c, ref_r, beta=beta,
                                           chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths,
                                           **(loss_params or {}))
            return losses.mean()

        # double backward: the fused CPU/GPU attention kernels have no second derivative; use the math one
        with sdpa_kernel([SDPBackend.MATH]):
            mean, stderr = hutchinson_trace(loss_fn, params, num_probes=num_probes, seed=seed + b)
        estimates.append(mean)
        variances.append(stderr**2 if stderr == stderr else 0.0)
    n = len(estimates)
    return sum(estimates) / n, (sum(variances) ** 0.5) / n


def judged_win_rates(policy, reference, tokenizer, prompts, judges, *, max_new_tokens, temperature, top_p,
                     batch_size, seed, judge_device=None, judge_against="reference", opponent_responses=None,
                     llm_options=None, out_dir=None) -> tuple[dict, list[dict]]:
    """Sample from policy and reference on ``prompts`` and judge both; each judge sees the whole conversation.

    ``judge_device`` places reward-model judges (default: theirs, "cuda" when available). An ``llm:MODEL`` judge
    (``LLMJudgeConfig(model=MODEL, **llm_options)``) compares the policy's responses with the reference's, or with
    ``opponent_responses`` when ``judge_against`` names another opponent (chosen, a samples file); its requests
    go to ``out_dir/judgments.jsonl``. The reference is sampled only when some judge needs it.
    """
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)
    policy_out = generate_responses(policy, tokenizer, prompts, **gen)
    needs_reference = any(_needs_reference(spec, judge_against) for spec in judges)
    ref_out = generate_responses(reference, tokenizer, prompts, **gen) if needs_reference else None
    samples = [{"prompt": p, "policy": a} for p, a in zip(prompts, policy_out, strict=True)]
    for i, row in enumerate(samples):
        if ref_out is not None:
            row["reference"] = ref_out[i]
        if opponent_responses is not None:
            row["opponent"] = opponent_responses[i]
    results, judgments = {"generation": generation_settings(**gen)}, []  # a dict: reports read the numbers only
    for spec in judges:
        if spec.startswith("llm:"):
            config = LLMJudgeConfig(model=spec.removeprefix("llm:"), **(llm_options or {}))
            opponent_out = ref_out if judge_against == "reference" else opponent_responses
            report = llm_judge_report(config, prompts, policy_out, opponent_out)
            results.update({f"winrate/{spec}/{k}": v for k, v in report.summary().items()})
            results[f"winrate/{spec}/opponent"] = str(judge_against)  # strings: reports read the numbers only
            results[f"winrate/{spec}/template"] = config.template
            results[f"winrate/{spec}/orders"] = "both" if config.both_orders else "random"
            for row, outcome in zip(samples, report.scores, strict=True):
                row[f"{spec}_outcome"] = outcome
            judgments += report.judgments
            continue
        judge = make_judge(spec, **({"device": judge_device} if spec.startswith("reward:") else {}))
        a, b = judge.score(prompts, policy_out), judge.score(prompts, ref_out)
        stats = win_rate(a, b)
        name = judge.name
        results.update({f"winrate/{name}/{k}": v for k, v in stats.items()})
        results[f"winrate/{name}/policy_mean"] = sum(a) / len(a)
        results[f"winrate/{name}/reference_mean"] = sum(b) / len(b)
        for row, sa, sb in zip(samples, a, b, strict=True):
            row[f"{name}_policy"], row[f"{name}_reference"] = sa, sb
    if judgments and out_dir is not None:
        write_text(Path(out_dir) / "judgments.jsonl", "".join(json.dumps(j) + "\n" for j in judgments))
    return results, samples


def llm_judge_report(config: LLMJudgeConfig, prompts, policy_responses, opponent_responses) -> JudgeReport:
    """Policy against opponent on each prompt, judged by the chat model ``config`` names."""
    http_client = _HTTP_CLIENT_FACTORY() if _HTTP_CLIENT_FACTORY is not None else None
    with LLMJudge(config, http_client=http_client) as judge:
        return judge.compare(prompts, policy_responses, opponent_responses)


def check_llm_judges(judges, options: dict | None) -> None:
    """Build each ``llm:MODEL`` judge once, sending nothing, so that a bad setting, an unknown template, a missing
    openai package or a missing API key stops the evaluation before any model loads (ValueError, ImportError)."""
    for spec in judges:
        if spec.startswith("llm:"):
            LLMJudge(LLMJudgeConfig(model=spec.removeprefix("llm:"), **(options or {}))).close()


def _needs_reference(spec: str, judge_against: str) -> bool:
    """Every judge compares with the reference's samples, except an LLM judge against chosen or a samples file."""
    return not (spec.startswith("llm:") and judge_against != "reference")


def _judges_to_run(judges, num_prompts: int, reference, policy, judge_against: str) -> tuple[list, str | None]:
    """The judges that run, and why the others do not (None when all run)."""
    if not judges:
        return [], "no judge"
    if num_prompts < 1:
        return [], f"num_prompts={num_prompts}"
    why = None
    if reference is None:
        why = "no reference model (not a logitsam run; pass ref_model_name_or_path)"
    elif reference is policy:
        why = "the reference is the policy itself"
    if why is None:
        return list(judges), None
    return [spec for spec in judges if not _needs_reference(spec, judge_against)], why


def judged_prompts(prompts: list | None, num_prompts: int, judge_against: str, dataset_name: str, *,
                   opponent_samples: list[tuple[Any, str]] | None = None,
                   **data_kwargs) -> tuple[list, list[str] | None]:
    """The first ``num_prompts`` prompts to judge (``prompts``, else the dataset's) and the opponent's response to
    each: None for the reference (sampled later), the dataset's chosen response, or a samples file's, by prompt
    (``opponent_samples``: the file as ``read_samples`` returns it; read here when None).

    Raises:
        ValueError: ``judge_against`` is "chosen" with ``prompts`` given (they have no chosen responses).
        DataError: the samples file is unreadable or lacks one of the prompts (``read_samples``, ``match_samples``).
    """
    examples = None
    if prompts is None:
        examples = _dataset_examples(dataset_name, **data_kwargs)[:num_prompts]
        prompts = [e["prompt"] for e in examples]
    prompts = prompts[:num_prompts]
    if judge_against == "reference":
        return prompts, None
    if judge_against == "chosen":
        if examples is None:
            raise ValueError("judge_against='chosen' takes the dataset's chosen responses, but the prompts were given "
                             "(a prompts file has none); judge the dataset's prompts instead")
        return prompts, [e["chosen"] for e in examples]
    if opponent_samples is None:
        opponent_samples = read_samples(judge_against)
    return prompts, match_samples(prompts, opponent_samples, judge_against)


def _json_lines(path: Path):
    """(line number, parsed record) for each non-blank line of a JSONL file; a bad line is a ``DataError``."""
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: line {lineno} is not a UTF-8 JSON line: {e}") from e


def read_samples(path: str | Path) -> list[tuple[Any, str]]:
    """(prompt, policy response) pairs from a previous `logitsam eval`: its ``eval_samples.jsonl`` (fields
    ``prompt`` and ``policy``) or its ``judgments.jsonl`` (the policy's side of ``response_a`` / ``response_b``,
    once per pair ``id``).

    Raises:
        DataError: the file is missing or unreadable, or a line lacks the prompt or the policy's response.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: " + ("is a directory" if path.is_dir() else "no such file") + " (the samples file)")
    pairs, pair_ids = [], set()
    for lineno, record in _json_lines(path):
        record = record if isinstance(record, dict) else {}
        if "response_a" in record:  # judgments.jsonl: one line per order asked
            if record.get("id") in pair_ids:
                continue
            pair_ids.add(record.get("id"))
            side = {"A": "response_a", "B": "response_b"}.get(record.get("policy"))
            response = record.get(side) if side else None
        else:
            response = record.get("policy")
        prompt = record.get("prompt")
        if not (isinstance(prompt, str | list) and prompt) or not isinstance(response, str):
            raise DataError(f"{path}: line {lineno}: expected a 'prompt' and the policy's response "
                            "(eval_samples.jsonl: 'policy'; judgments.jsonl: 'policy' A or B with 'response_a' and "
                            "'response_b')")
        pairs.append((prompt, response))
    if not pairs:
        raise DataError(f"{path}: no samples")
    return pairs


def match_samples(prompts: list, samples: list[tuple[Any, str]], source: str | Path) -> list[str]:
    """The sample response to each prompt, matched by prompt; the k-th occurrence of a prompt takes its k-th sample.

    Raises:
        DataError: naming ``source`` and the first prompt it has no (k-th) sample for.
    """
    by_prompt: dict[str, list[str]] = {}
    for prompt, response in samples:
        by_prompt.setdefault(json.dumps(prompt, sort_keys=True), []).append(response)
    seen: Counter = Counter()
    responses = []
    for i, prompt in enumerate(prompts):
        key = json.dumps(prompt, sort_keys=True)
        found, k = by_prompt.get(key, []), seen[key]
        seen[key] += 1
        if k >= len(found):
            text = render_conversation(prompt)
            shown = repr(text[:80]) + ("..." if len(text) > 80 else "")
            times = f" (it has {len(found)} of this prompt, judged {k + 1} times here)" if found else ""
            raise DataError(f"{source}: no sample for judged prompt {i}, {shown}{times}; pass the samples of a run "
                            "on the same prompts (same data, as many prompts or more)")
        responses.append(found[k])
    return responses


def load_prompts(path: str | Path) -> list:
    """The ``prompt`` field of each line of a JSON Lines file (a string or a message list).

    Raises:
        DataError: the file is missing or unreadable, or a line is not a JSON object with a ``prompt``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("is a directory" if path.is_dir() else "no such file"))
    prompts = []
    for lineno, record in _json_lines(path):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(f"{path}: line {lineno}, field 'prompt': expected a non-empty string or message list, "
                            f"got {prompt!r}")
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def evaluate(model_name_or_path: str, *, dataset_name: str, split: str = "test", data_format: str = "auto",
             max_samples: int | None = None, max_length: int = 1024, max_prompt_length: int | None = None,
             truncation_mode: str = "keep_start", chat_rendering: str = "trl", apply_chat_template: bool | None = None,
             on_invalid: str = "drop", ref_model_name_or_path: str | None = None,
             loss_type="sigmoid", beta: float = 0.1, loss_params: dict | None = None, batch_size: int = 8,
             chunk_size: int | str | None = "auto", vocab_chunk_size: int | None = DEFAULT_VOCAB_CHUNK_SIZE,
             judges=("vader",), prompts: list | None = None, num_prompts: int = 64,
             max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0, gen_batch_size: int = 16,
             seed: int = 0, hessian_probes: int = 0, hessian_batches: int = 1, hessian_head_only: bool = False,
             output_dir: str | Path | None = None, dtype: str = "float32", device: str | None = None,
             export: str | None = None, export_questions: list[dict] | None = None,
             export_model_id: str | None = None, llm_judge: dict | None = None,
             judge_against: str = "reference") -> dict:
    """Evaluate ``model_name_or_path`` against a reference on ``device`` (default: ``default_device()``).

    Both models are loaded in ``dtype`` (float32, bfloat16, float16 or auto, the checkpoint's own). Their
    log-probs go through the dense head (``chunk_size`` None), the chunked one (an int: tokens per chunk, with
    ``vocab_chunk_size`` vocabulary entries per slice) or, for "auto", the chunked one when a batch's fp32
    logits (2 x ``batch_size`` x ``max_length`` x V x 4 bytes) would exceed 1 GiB, as in training.
    The reference is ``ref_model_name_or_path`` when given, else the one the run trained against
    (``run_reference_of``). Both models must compute logits as hidden @ W^T (``check_linear_head``, on the
    first pairs).

    ``export`` (alpaca_eval, mt_bench or arena_hard) writes the policy's answers to ``export_questions``
    (``export.read_questions``; for alpaca_eval the dataset's single-turn prompts when None) under
    ``output_dir/export/``, filed as ``export_model_id`` (default: the model path's last part), sampled with
    the generation settings above.

    A judge ``llm:MODEL`` is ``LLMJudgeConfig(model=MODEL, **llm_judge)`` and judges the policy against
    ``judge_against``: "reference" (the reference's samples), "chosen" (the dataset's chosen responses; not with
    ``prompts``) or the path of a previous run's ``eval_samples.jsonl`` or ``judgments.jsonl`` (its policy's
    response to each prompt). The judges and a samples file are checked before any model loads, and the file is
    matched to the prompts before any sampling.
    """
    if export is not None and output_dir is None:
        raise ValueError(f"export={export!r} needs an output_dir")
    if export is not None and export != "alpaca_eval" and export_questions is None:
        raise ValueError(f"export={export!r} needs export_questions (its question.jsonl)")
    check_llm_judges(judges, llm_judge)
    if not any(spec.startswith("llm:") for spec in judges):
        judge_against = "reference"  # only an LLM judge takes another opponent
    # a samples file is read before any model loads, and matched to the prompts once the data is checked
    opponent_samples = None if judge_against in OPPONENTS else read_samples(judge_against)
    ref_name, ref_from = ref_model_name_or_path, "ref_model_name_or_path"
    if ref_name is None:
        ref_name, ref_from = run_reference_of(model_name_or_path)
    device = device or default_device()
    tokenizer = load_tokenizer(model_name_or_path)
    if export is not None:
        check_chat_template(tokenizer, export)  # before the models load and the metrics run
    policy, reference = _load_pair(model_name_or_path, ref_name, dtype, device)
    if reference is not None:
        logger.info("reference: %s (from %s)", ref_name, ref_from)
    dataset, report = build_preference_dataset(
        dataset_name, tokenizer, split=split, data_format=data_format, max_length=max_length,
        max_prompt_length=max_prompt_length, truncation_mode=truncation_mode, chat_rendering=chat_rendering,
        apply_chat_template=apply_chat_template, on_invalid=on_invalid, max_samples=max_samples)
    opponent = None
    if judges and num_prompts > 0:
        prompts, opponent = judged_prompts(prompts, num_prompts, judge_against, dataset_name,
                                           opponent_samples=opponent_samples, split=split, data_format=data_format,
                                           max_samples=max_samples)
    pad = tokenizer.pad_token_id
    vocab = lm_head_of(policy).weight.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, tokens=2 * batch_size * max_length, vocab_size=vocab)
    vocab_chunk_size = None if chunk_size is None else vocab_chunk_size
    logger.info("LM head: %s (fp32 logits of one batch: %d tokens x V=%d = %.2f GiB)",
                head_description(chunk_size, vocab_chunk_size), 2 * batch_size * max_length, vocab,
                2 * batch_size * max_length * vocab * 4 / 2**30)
    first = next(_batches(dataset, 2, pad))
    check_linear_head(policy, first["input_ids"], first["attention_mask"], name=model_name_or_path)
    if reference is not None and reference is not policy:
        check_linear_head(reference, first["input_ids"], first["attention_mask"], name=ref_name)
    results: dict = {"model": str(model_name_or_path), "reference": None if ref_name is None else str(ref_name),
                     "reference_from": ref_from, "device": str(device),
                     "dtype": str(next(policy.parameters()).dtype).removeprefix("torch."),
                     "lm_head": head_description(chunk_size, vocab_chunk_size),
                     "dataset": str(dataset_name), "split": split, "dropped_rows": report.dropped}
    head = dict(pad_token_id=pad, batch_size=batch_size, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
    pol = pair_outputs(policy, dataset, desc="policy log-probs", **head)
    ref = None
    if reference is not None:
        ref = pol if reference is policy else pair_outputs(reference, dataset, desc="reference log-probs", **head)
    results.update(preference_metrics(pol, ref, loss_type, beta, loss_params))
    shifts = squeeze_metrics(pol, *((ref.chosen_logps, ref.rejected_logps) if ref is not None else ()))
    results.update({k.replace("squeeze/", "shift/"): v for k, v in shifts.items()})
    results["flatness/logit_hessian_trace"] = shifts.get("squeeze/logit_hessian_trace")
    samples = []
    run_judges, skip = _judges_to_run(judges, num_prompts, reference, policy, judge_against)
    if skip:
        skipped = [spec for spec in judges if spec not in run_judges]
        logger.info("judged win rate skipped%s: %s", f" for {', '.join(skipped)}" if run_judges else "", skip)
    if run_judges:
        wins, samples = judged_win_rates(policy, reference, tokenizer, prompts, run_judges,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         batch_size=gen_batch_size, seed=seed, judge_device=device,
                                         judge_against=judge_against, opponent_responses=opponent,
                                         llm_options=llm_judge, out_dir=output_dir)
        results.update(wins)
    if export is not None:
        if export_questions is None:
            export_questions = questions_from_prompts(
                _dataset_prompts(dataset_name, split=split, data_format=data_format, max_samples=max_samples))
        results["export"] = export_answers(
            policy, tokenizer, export, export_questions, output_dir=Path(output_dir) / "export",
            model_id=export_model_id or default_model_id(model_name_or_path), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, batch_size=gen_batch_size, seed=seed)
    if hessian_probes > 0:
        mean, stderr = hessian_trace_of_loss(policy, dataset, pad_token_id=pad, ref=ref, loss_type=loss_type,
                                             beta=beta, loss_params=loss_params, batch_size=batch_size,
                                             num_batches=hessian_batches, num_probes=hessian_probes, seed=seed,
                                             head_only=hessian_head_only)
        results["flatness/hessian_trace"], results["flatness/hessian_trace_stderr"] = mean, stderr
    if output_dir is not None:
        _write_results(Path(output_dir), results, samples)
    return results


def _dataset_examples(dataset_name, **kwargs) -> list:
    """Every valid pair of the eval data (invalid rows dropped, as for the metrics)."""
    examples, _ = load_preference_examples(dataset_name, on_invalid="drop", **kwargs)
    return examples


def _dataset_prompts(dataset_name, **kwargs) -> list:
    """The ``prompt`` of every valid pair of the eval data."""
    return [e["prompt"] for e in _dataset_examples(dataset_name, **kwargs)]


def _load_pair(model_name_or_path, ref_name, dtype, device):
    """The policy and its reference (the same object when they name the same model; None without one)."""
    policy = load_model(model_name_or_path, dtype=dtype, device=device)
    if ref_name is None:
        return policy, None
    same = str(ref_name) == str(model_name_or_path)
    return policy, policy if same else load_model(ref_name, dtype=dtype, device=device)


def _write_results(out: Path, results: dict, samples: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_results.json", results, indent=2)
    if samples:
        write_text(out / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    logger.info("wrote %s", out / "eval_results.json")
