"""`logitsam eval`: a checkpoint (or the initial model) against a reference on held-out pairs.

Three groups of numbers, written flat to ``eval_results.json``:
- ``eval/*``: implicit-reward preference accuracy, margin and loss on held-out pairs;
- ``shift/*``: held-out log-prob shifts vs the reference (the squeeze diagnostics, unperturbed head);
- ``winrate/<judge>/*``: judged generations of policy vs reference with a confidence interval, their sampling
  settings under ``generation``;
- ``flatness/*``: Hutchinson estimate of the parameter-Hessian trace of the preference loss, and the
  closed-form logit-Hessian trace.

With ``export``, the policy also answers a benchmark's questions in the official tool's format
(``logitsam.eval.export``); ``export`` records the file, the sampling settings and samples per second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
from .stats import win_rate

logger = logging.getLogger("logitsam.eval")


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
                     batch_size, seed, judge_device=None) -> tuple[dict, list[dict]]:
    """Sample from policy and reference on ``prompts`` and judge both; each judge sees the whole conversation.

    ``judge_device`` places reward-model judges (default: theirs, "cuda" when available).
    """
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)
    policy_out = generate_responses(policy, tokenizer, prompts, **gen)
    ref_out = generate_responses(reference, tokenizer, prompts, **gen)
    results, samples = {}, [{"prompt": p, "policy": a, "reference": b} for p, a, b in zip(prompts, policy_out, ref_out,
                                                                                          strict=True)]
    results["generation"] = generation_settings(**gen)  # a dict: reports read the numbers only
    for spec in judges:
        judge = make_judge(spec, **({"device": judge_device} if spec.startswith("reward:") else {}))
        a, b = judge.score(prompts, policy_out), judge.score(prompts, ref_out)
        stats = win_rate(a, b)
        name = judge.name
        results.update({f"winrate/{name}/{k}": v for k, v in stats.items()})
        results[f"winrate/{name}/policy_mean"] = sum(a) / len(a)
        results[f"winrate/{name}/reference_mean"] = sum(b) / len(b)
        for row, sa, sb in zip(samples, a, b, strict=True):
            row[f"{name}_policy"], row[f"{name}_reference"] = sa, sb
    return results, samples


def _win_rate_skipped(judges, num_prompts: int, reference, policy) -> str | None:
    """Why no judged generation runs, or None when it does."""
    if not judges:
        return "no judge"
    if num_prompts < 1:
        return f"num_prompts={num_prompts}"
    if reference is None:
        return "no reference model (not a logitsam run; pass ref_model_name_or_path)"
    if reference is policy:
        return "the reference is the policy itself"
    return None


def load_prompts(path: str | Path) -> list:
    """The ``prompt`` field of each line of a JSON Lines file (a string or a message list).

    Raises:
        DataError: the file is missing or unreadable, or a line is not a JSON object with a ``prompt``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("is a directory" if path.is_dir() else "no such file"))
    prompts = []
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: line {lineno} is not a UTF-8 JSON line: {e}") from e
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
             export_model_id: str | None = None) -> dict:
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
    """
    if export is not None and output_dir is None:
        raise ValueError(f"export={export!r} needs an output_dir")
    if export is not None and export != "alpaca_eval" and export_questions is None:
        raise ValueError(f"export={export!r} needs export_questions (its question.jsonl)")
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
    skip = _win_rate_skipped(judges, num_prompts, reference, policy)
    if skip:
        logger.info("judged win rate skipped: %s", skip)
    else:
        if prompts is None:
            prompts = _dataset_prompts(dataset_name, split=split, data_format=data_format, max_samples=max_samples)
        prompts = prompts[:num_prompts]
        wins, samples = judged_win_rates(policy, reference, tokenizer, prompts, judges, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, batch_size=gen_batch_size, seed=seed,
                                         judge_device=device)
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


def _dataset_prompts(dataset_name, **kwargs) -> list:
    """The ``prompt`` of every valid pair of the eval data (invalid rows dropped, as for the metrics)."""
    examples, _ = load_preference_examples(dataset_name, on_invalid="drop", **kwargs)
    return [e["prompt"] for e in examples]


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
