"""The simulator's runs, their analytic budget and the markdown tables: the variants of each shape, side by side.

With ``trainers`` other than ``ours`` (``step.TRAINERS``), each shape gets one table of trainers: logitsam's own
(precomputed reference; every head, DPO and logits-SAM), ``LogitsSAMDPOTrainer`` at its defaults (logits-SAM,
rho 1e-4, one row per head: ``auto`` is its default ``sam_chunk_size``) and TRL's ``DPOTrainer`` at its defaults
(its fused head; one row), each with its extra over TRL's.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..core.head_chunked import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE
from ..train.run import resolve_chunk_size
from . import HEADS, LOSSES, PRECISIONS, TRAINERS
from .shapes import model_config
from .step import COLUMNS, SUBCLASS_DEFAULTS, Batch, simulate_step

GIB = 2**30


def head_chunk_size(head: str, config: PreTrainedConfig, batch: Batch) -> int | None:
    """``--head`` as the trainer resolves ``sam_chunk_size``: dense None, chunked 512, auto by the 1 GiB rule."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "dense":
        return None
    if head == "chunked":
        return DEFAULT_CHUNK_SIZE
    return resolve_chunk_size("auto", tokens=batch.rows * batch.seq_len, vocab_size=config.vocab_size)


def subclass_chunk_size(head: str, config: PreTrainedConfig, batch: Batch) -> int | None:
    """``sam_chunk_size`` as ``LogitsSAMDPOTrainer.step`` resolves it: "auto" on 2 x max(train, eval batch) x
    max_length tokens (TRL's per_device_eval_batch_size defaults to 8, like the train batch)."""
    if head != "auto":
        return head_chunk_size(head, config, batch)
    pairs = max(batch.pairs, SUBCLASS_DEFAULTS["per_device_eval_batch_size"])
    return resolve_chunk_size(SUBCLASS_DEFAULTS["sam_chunk_size"], tokens=2 * pairs * batch.seq_len,
                              vocab_size=config.vocab_size)


# TRL 1.16's fused head (trl.kernels.chunked_logprob): token tiles of 4,096, vocabulary slices of 32,768
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768


def budget(config: PreTrainedConfig, *, num_params: int, num_param_tensors: int, precision: str, batch: Batch,
           world_size: int, chunk_size: int | None, trainer: str = "ours") -> dict[str, int]:
    """The analytic per-device bytes of the package docstring's budget (N parameters, W = max(world_size, 1)).

    A live reference (``trl``, ``trl-subclass``) adds its parameters (N b) and, under autocast over float32
    weights, the bf16 copies autocast caches while the reference forward runs (2 N: TRL leaves the reference's
    ``requires_grad`` set, and autocast caches the casts of such leaves even under ``no_grad``). ``trl``'s fused
    head on the CPU scores every position, 2B x (T - 1), in tiles of 4,096 tokens x 32,768 vocabulary: one bf16
    tile buffer of that size (``trl_tile``, whatever V), and ``trl_fold``, one float32 tile (at most V wide), the
    unit of its torch fold's temporaries (several at a time) that the Triton kernels of a GPU run do not allocate;
    ``trl_grad_weight`` is the float32 (V, d) accumulator its backward returns as the head's gradient.
    """
    W = max(world_size, 1)
    master = 4 if precision == "bf16-autocast" else 2  # float32 master weights, or bf16 weights
    residual = 4 if precision == "bf16-autocast" and not world_size else 2  # FSDP2 mixed precision gathers bf16
    V, d = config.vocab_size, config.hidden_size
    vocab_chunk = min(DEFAULT_VOCAB_CHUNK_SIZE, V)
    return {
        "params": num_params * master // W,
        "grads": num_params * master // W,
        "optimizer": 2 * num_params * master // W + 4 * num_param_tensors,  # + fused AdamW's float32 step counts
        "autocast_cache": 2 * num_params if precision == "bf16-autocast" and not world_size else 0,
        "layer_inputs": config.num_hidden_layers * batch.rows * batch.seq_len * d * residual,
        "logits": batch.completion_tokens * V * 4,
        "eps": V * d * 2,
        "chunk_block": 0 if chunk_size is None else min(chunk_size, batch.completion_tokens) * vocab_chunk * 4,
        "gathered_head": V * d * 2 if world_size else 0,  # bf16: the mixed-precision gather, or bf16 weights
        "reference": 0 if trainer == "ours" else num_params * master,
        "reference_autocast_cache": 2 * num_params if trainer != "ours" and precision == "bf16-autocast" else 0,
        "trl_tile": 0 if trainer != "trl" else min(TRL_TOKEN_TILE, batch.rows * (batch.seq_len - 1))
        * TRL_VOCAB_TILE * 2,
        "trl_fold": 0 if trainer != "trl" else min(TRL_TOKEN_TILE, batch.rows * (batch.seq_len - 1))
        * min(TRL_VOCAB_TILE, V) * 4,
        "trl_grad_weight": 0 if trainer != "trl" else V * d * 4,
    }


def plan(models, heads, precisions, batch: Batch, trainers=TRAINERS[:1]) -> list[dict]:
    """One row per (model, precision, trainer, head, loss): ``ours`` every head with DPO and logits-SAM,
    ``trl-subclass`` every head with logits-SAM at its default rho, ``trl`` its fused head with DPO; rows whose
    head resolves to the same chunk size share a run."""
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    for t in trainers:
        if t not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {t!r}")
    rows = []
    for name in models:
        config = model_config(name)
        for precision in precisions:
            for trainer in trainers:
                row = {"model": name, "precision": precision, "trainer": trainer}
                if trainer == "trl":
                    rows.append({**row, "head": "fused", "chunk_size": None, "loss": "dpo"})
                    continue
                for head in heads:
                    if trainer == "ours":
                        chunk = head_chunk_size(head, config, batch)
                        rows += [{**row, "head": head, "chunk_size": chunk, "loss": loss} for loss in LOSSES]
                    else:
                        rows.append({**row, "head": head, "chunk_size": subclass_chunk_size(head, config, batch),
                                     "loss": "logits-sam"})
    return rows


def _rho(row: dict, rho: float) -> float:
    if row["loss"] == "dpo":
        return 0.0
    return SUBCLASS_DEFAULTS["sam_rho"] if row["trainer"] == "trl-subclass" else rho


def _key(row: dict) -> tuple:
    return row["model"], row["precision"], row["trainer"], row["chunk_size"], row["loss"]


def run(models, *, heads=HEADS, precisions=PRECISIONS[:1], batch: Batch | None = None, rho: float = 1e-3,
        world_size: int = 0, gradient_checkpointing: bool = True, progress: bool = True,
        trainers=TRAINERS[:1]) -> dict:
    """Simulate every planned row (each distinct step once) and add its budget and its extra over DPO (``ours``
    rows) and over TRL's DPOTrainer (every row, when ``trl`` is among the trainers).

    ``rho`` (> 0), logitsam's own logits-SAM rows' radius, changes no buffer's size; logits-SAM runs its full path
    at any radius. ``trl-subclass`` rows run at LogitsSAMConfig's default ``sam_rho``.
    """
    from tqdm.auto import tqdm

    if rho <= 0:
        raise ValueError(f"rho must be > 0 for the logits-SAM rows, got {rho}")
    if world_size and any(t != "ours" for t in trainers):
        raise ValueError("the TRL trainers (a live reference model) are simulated in one process only: "
                         "drop --fsdp or use --trainer ours")
    batch = batch or Batch()
    rows = plan(models, heads, precisions, batch, trainers)
    keys = list(dict.fromkeys(_key(r) for r in rows))
    todo = {_key(r): r for r in rows}
    steps = {}
    for key in tqdm(keys, desc="simulated steps", unit="step", disable=not progress):
        name, precision, trainer, chunk, _ = key
        steps[key] = simulate_step(model_config(name), rho=_rho(todo[key], rho), chunk_size=chunk,
                                   precision=precision, batch=batch, world_size=world_size,
                                   gradient_checkpointing=gradient_checkpointing, trainer=trainer)
    for r in rows:
        step = steps[_key(r)]
        r.update(step, rho=_rho(r, rho), world_size=world_size)
        r["reference"] = "precomputed" if r["trainer"] == "ours" else "live model"
        r["extra_over_dpo"] = r["extra_over_dpo_pct"] = None
        if r["trainer"] == "ours":
            dpo = steps[_key({**r, "loss": "dpo"})]
            r["extra_over_dpo"] = step["peak"]["peak"] - dpo["peak"]["peak"]
            r["extra_over_dpo_pct"] = 100 * r["extra_over_dpo"] / dpo["peak"]["peak"]
        trl = steps.get((r["model"], r["precision"], "trl", None, "dpo"))
        r["extra_over_trl"] = None if trl is None else step["peak"]["peak"] - trl["peak"]["peak"]
        r["extra_over_trl_pct"] = None if trl is None else 100 * r["extra_over_trl"] / trl["peak"]["peak"]
        r["budget"] = budget(model_config(r["model"]), num_params=step["num_params"],
                             num_param_tensors=step["num_param_tensors"], precision=r["precision"], batch=batch,
                             world_size=world_size, chunk_size=r["chunk_size"], trainer=r["trainer"])
    settings = {"models": list(models), "heads": list(heads), "precisions": list(precisions), "rho": rho,
                "trainers": list(trainers), "subclass_rho": SUBCLASS_DEFAULTS["sam_rho"],
                "pairs": batch.pairs, "seq_len": batch.seq_len, "completion_fraction": batch.completion_fraction,
                "completion_tokens": batch.completion_tokens, "world_size": world_size,
                "gradient_checkpointing": gradient_checkpointing, "optimizer": "AdamW (fused)"}
    return {"settings": settings, "rows": rows}


def _unit(rows: list[dict]) -> tuple[str, int]:
    return ("GiB", GIB) if max(r["peak"]["peak"] for r in rows) >= GIB else ("MiB", 2**20)


def markdown_table(rows: list[dict]) -> str:
    """Rows of one model: variants down, the categories at the step's peak across, then the extra over DPO."""
    unit, div = _unit(rows)
    names = " | ".join("temps/other" if c == "temps" else c for c in COLUMNS)
    lines = [f"| precision | head | loss | {names} | peak {unit} | peak in | extra over DPO {unit} | % |",
             "|---|---|---|" + "---:|" * (len(COLUMNS) + 1) + "---|---:|---:|"]
    for r in rows:
        head = r["head"] if r["head"] != "auto" else f"auto ({'dense' if r['chunk_size'] is None else 'chunked'})"
        cells = [r["precision"], head, r["loss"], *(f"{r['peak'][c] / div:.2f}" for c in COLUMNS),
                 f"{r['peak']['peak'] / div:.2f}", r["peak_phase"], f"{r['extra_over_dpo'] / div:+.3f}",
                 f"{r['extra_over_dpo_pct']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_line(row: dict, unit: str, div: int) -> str:
    b = row["budget"]
    parts = [f"params {b['params'] / div:.2f}", f"grads {b['grads'] / div:.2f}", f"AdamW {b['optimizer'] / div:.2f}",
             f"layer inputs {b['layer_inputs'] / div:.2f}", f"dense fp32 logits (n x V) {b['logits'] / div:.2f}",
             f"eps (V x d, bf16) {b['eps'] / div:.2f}"]
    if b["autocast_cache"]:
        parts.insert(3, f"autocast weight cache {b['autocast_cache'] / div:.2f}")
    if b["chunk_block"]:
        parts.append(f"one fp32 logits block {b['chunk_block'] / div:.2f}")
    if b["gathered_head"]:
        parts.append(f"gathered bf16 head {b['gathered_head'] / div:.2f}")
    return f"analytic budget ({row['precision']}), {unit}: " + ", ".join(parts)


def _head_cell(r: dict) -> str:
    if r["trainer"] == "trl":
        return "TRL fused (CPU path)"
    return r["head"] if r["head"] != "auto" else f"auto ({'dense' if r['chunk_size'] is None else 'chunked'})"


PHASES = ("reference", "forward", "head", "head backward", "backward", "optimizer")


def trainer_table(rows: list[dict]) -> str:
    """Rows of one model: trainers down, the categories at the step's peak across, then the extra over TRL's
    DPOTrainer; below, each row's peak in every phase of its step."""
    unit, div = _unit(rows)
    names = " | ".join("temps/other" if c == "temps" else c for c in COLUMNS)
    lines = [f"| trainer | precision | head | loss | reference | {names} | peak {unit} | peak in | "
             f"extra vs trl {unit} | % |",
             "|---|---|---|---|---|" + "---:|" * (len(COLUMNS) + 1) + "---|---:|---:|"]
    for r in rows:
        loss = r["loss"] if r["loss"] == "dpo" else f"logits-sam (rho {r['rho']:g})"
        extra = ["-", "-"] if r["extra_over_trl"] is None else [f"{r['extra_over_trl'] / div:+.3f}",
                                                               f"{r['extra_over_trl_pct']:+.2f}"]
        cells = [r["trainer"], r["precision"], _head_cell(r), loss, r["reference"],
                 *(f"{r['peak'][c] / div:.2f}" for c in COLUMNS), f"{r['peak']['peak'] / div:.2f}", r["peak_phase"],
                 *extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Peak of each phase, {unit} (reference: the live reference's forward; head: the policy's head "
              "pass; head backward: the backward until the head's input has its gradient, a part of backward):",
              "", "| trainer | head | loss | " + " | ".join(PHASES) + " |",
              "|---|---|---|" + "---:|" * len(PHASES)]
    for r in rows:
        phases = {**r["phases"], **r.get("phase_parts", {})}
        cells = [r["trainer"], _head_cell(r), r["loss"],
                 *(f"{phases[ph]['peak'] / div:.2f}" if ph in phases else "-" for ph in PHASES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_line(row: dict, unit: str, div: int) -> str:
    """The live reference's and TRL's fused head's analytic terms (``budget``)."""
    b = row["budget"]
    parts = [f"reference params {b['reference'] / div:.2f}"]
    if b["reference_autocast_cache"]:
        parts.append(f"its bf16 autocast cache during its forward {b['reference_autocast_cache'] / div:.2f}")
    if b["trl_tile"]:
        parts += [f"TRL fused head: bf16 tile buffer {b['trl_tile'] / div:.2f}",
                  f"fp32 fold temporary (CPU path only, several alive) {b['trl_fold'] / div:.3f} each",
                  f"fp32 head-gradient accumulator (V x d) {b['trl_grad_weight'] / div:.2f}"]
    return f"live reference ({row['precision']}), {unit}: " + ", ".join(parts)


def markdown_report(result: dict) -> str:
    """Every model's table, each followed by its analytic budget (one line per precision)."""
    s = result["settings"]
    trainers = s.get("trainers", ["ours"])
    where = f"FSDP2, {s['world_size']} ranks (per rank)" if s["world_size"] else "one process"
    rho = f"rho {s['rho']:g}" + (f" (LogitsSAMDPOTrainer: {s['subclass_rho']:g})" if "trl-subclass" in trainers
                                 else "")
    out = [f"{s['pairs']} pairs x {s['seq_len']} tokens per device, {s['completion_tokens']} completion tokens, "
           f"{rho}, {where}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
           f"{s['optimizer']}. Tensor bytes at the step's peak (the allocated peak); not counted: kernel "
           "workspaces (cuBLAS, NCCL, SDPA) and the caching allocator's fragmentation (see `logitsam.simulate`)."]
    if trainers != ["ours"]:
        out.append("Trainers: ours = logitsam's PreferenceTrainer (precomputed reference log-probs); trl-subclass = "
                   "LogitsSAMDPOTrainer at LogitsSAMConfig's defaults; trl = TRL 1.16's DPOTrainer at DPOConfig's "
                   "defaults. Both TRL trainers keep TRL's default live reference model (precompute_ref_log_probs="
                   "False). TRL's fused head runs its CPU path here: every position scored and torch fold "
                   "temporaries that its Triton kernels do not have on a GPU (see `logitsam.simulate.step`).")
    for name in s["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        unit, div = _unit(rows)
        N = rows[0]["num_params"]
        size = f"{N / 1e9:.2f}B" if N >= 1e8 else f"{N / 1e6:.2f}M"
        table = markdown_table(rows) if trainers == ["ours"] else trainer_table(rows)
        out += ["", f"### {name} ({size} parameters)", "", table, ""]
        for p in dict.fromkeys(r["precision"] for r in rows):  # a chunked row's budget also has its logits block
            mine = [r for r in rows if r["precision"] == p]
            out.append(budget_line(next((r for r in mine if r["chunk_size"]), mine[0]), unit, div))
            live = [r for r in mine if r["trainer"] != "ours"]
            if live:
                out.append(reference_line(next((r for r in live if r["trainer"] == "trl"), live[0]), unit, div))
    return "\n".join(out)
