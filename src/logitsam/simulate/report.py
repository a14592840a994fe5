"""The simulator's runs, their analytic budget and the markdown table: the variants of each shape, side by side."""

from __future__ import annotations

from transformers import PreTrainedConfig

from ..core.head_chunked import DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE
from ..train.run import resolve_chunk_size
from . import HEADS, LOSSES, PRECISIONS
from .shapes import model_config
from .step import COLUMNS, Batch, simulate_step

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


def budget(config: PreTrainedConfig, *, num_params: int, num_param_tensors: int, precision: str, batch: Batch,
           world_size: int, chunk_size: int | None) -> dict[str, int]:
    """The analytic per-device bytes of the package docstring's budget (N parameters, W = max(world_size, 1))."""
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
    }


def plan(models, heads, precisions, batch: Batch) -> list[dict]:
    """One row per (model, precision, head, loss); rows whose head resolves to the same chunk size share a run."""
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    rows = []
    for name in models:
        config = model_config(name)
        for precision in precisions:
            for head in heads:
                chunk = head_chunk_size(head, config, batch)
                rows += [{"model": name, "precision": precision, "head": head, "chunk_size": chunk, "loss": loss}
                         for loss in LOSSES]
    return rows


def run(models, *, heads=HEADS, precisions=PRECISIONS[:1], batch: Batch | None = None, rho: float = 1e-3,
        world_size: int = 0, gradient_checkpointing: bool = True, progress: bool = True) -> dict:
    """Simulate every planned row (each distinct step once) and add its budget and its extra over DPO.

    ``rho`` (> 0) changes no buffer's size; logits-SAM runs its full path at any radius.
    """
    from tqdm.auto import tqdm

    if rho <= 0:
        raise ValueError(f"rho must be > 0 for the logits-SAM rows, got {rho}")
    batch = batch or Batch()
    rows = plan(models, heads, precisions, batch)
    keys = list(dict.fromkeys((r["model"], r["precision"], r["chunk_size"], r["loss"]) for r in rows))
    steps = {}
    for key in tqdm(keys, desc="simulated steps", unit="step", disable=not progress):
        name, precision, chunk, loss = key
        steps[key] = simulate_step(model_config(name), rho=rho if loss == "logits-sam" else 0.0, chunk_size=chunk,
                                   precision=precision, batch=batch, world_size=world_size,
                                   gradient_checkpointing=gradient_checkpointing)
    for r in rows:
        step = steps[(r["model"], r["precision"], r["chunk_size"], r["loss"])]
        dpo = steps[(r["model"], r["precision"], r["chunk_size"], "dpo")]
        r.update(step, rho=rho if r["loss"] == "logits-sam" else 0.0, world_size=world_size)
        r["extra_over_dpo"] = step["peak"]["peak"] - dpo["peak"]["peak"]
        r["extra_over_dpo_pct"] = 100 * r["extra_over_dpo"] / dpo["peak"]["peak"]
        r["budget"] = budget(model_config(r["model"]), num_params=step["num_params"],
                             num_param_tensors=step["num_param_tensors"], precision=r["precision"], batch=batch,
                             world_size=world_size, chunk_size=r["chunk_size"])
    settings = {"models": list(models), "heads": list(heads), "precisions": list(precisions), "rho": rho,
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


def markdown_report(result: dict) -> str:
    """Every model's table, each followed by its analytic budget (one line per precision)."""
    s = result["settings"]
    where = f"FSDP2, {s['world_size']} ranks (per rank)" if s["world_size"] else "one process"
    out = [f"{s['pairs']} pairs x {s['seq_len']} tokens per device, {s['completion_tokens']} completion tokens, "
           f"rho {s['rho']:g}, {where}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
           f"{s['optimizer']}. Tensor bytes at the step's peak (the allocated peak); not counted: kernel "
           "workspaces (cuBLAS, NCCL, SDPA) and the caching allocator's fragmentation (see `logitsam.simulate`)."]
    for name in s["models"]:
        rows = [r for r in result["rows"] if r["model"] == name]
        unit, div = _unit(rows)
        N = rows[0]["num_params"]
        size = f"{N / 1e9:.2f}B" if N >= 1e8 else f"{N / 1e6:.2f}M"
        out += ["", f"### {name} ({size} parameters)", "", markdown_table(rows), ""]
        for p in dict.fromkeys(r["precision"] for r in rows):  # a chunked row's budget also has its logits block
            mine = [r for r in rows if r["precision"] == p]
            out.append(budget_line(next((r for r in mine if r["chunk_size"]), mine[0]), unit, div))
    return "\n".join(out)
