"""Entry of ``test_trl_zero3.py``: one ``LogitsSAMDPOTrainer`` step (logits-SAM, live reference, SGD) from a model
directory on disk, under DeepSpeed ZeRO-3 on 2 CPU processes (gloo) or in one plain process.

    torchrun --nproc_per_node 2 _trl_zero3_launch.py WORKDIR OUT zero3   # WORKDIR/{model,pairs.jsonl,zero3.json}
    python _trl_zero3_launch.py WORKDIR OUT single

ZeRO-3 on CPU processes needs two workarounds (as in ``tests/train/_sharded_launch.py``, copied here so that this
test does not depend on those files): accelerate finds no accelerator backend and records a 1-process run although
DeepSpeed initialised torch.distributed for 2 (the process count is taken from torch.distributed), and DeepSpeed's
shared-memory comm op is not built (a JIT compile). The model is given as a path, so it is loaded under
``zero.Init`` (the DeepSpeed config is active once the config exists): every parameter, the tiny ones included
(``stage3_param_persistence_threshold: 0``), is an empty partition outside its module's forward from load time on.

The ``zero3`` run uses micro-batches of 2 pairs on each of 2 ranks; the ``single`` run the same 4 pairs as 2
accumulated micro-batches of 2 in one process (sequential sampling), so that logits-SAM's per-micro-batch
perturbation (``sam_norm="local"``) and the averaged gradient are the same. Rank 0 writes ``OUT/result.json``
(the logged step, logitsam.trl's log lines, the parameter count and how many were empty ZeRO-3 partitions
during training) and the
trained weights (``save_model``, gathered from the partitions).
"""

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared CPU workarounds
from _cpu_workarounds import deepspeed_on_cpu  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run(workdir, out, mode):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer

    workdir, out = Path(workdir), Path(out)
    zero3 = mode == "zero3"
    if zero3:
        deepspeed_on_cpu()
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    args = LogitsSAMConfig(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1 if zero3 else 2,
        max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to="none",
        logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True, beta=0.5,
        max_length=64, bf16=False, train_sampling_strategy="sequential", sam_rho=0.05, sam_norm="local",
        use_cpu=not zero3, deepspeed=str(workdir / "zero3.json") if zero3 else None)
    seen = {}
    messages = []

    class Keep(logging.Handler):  # the head step's chunking line names the vocabulary it sized the head by
        def emit(self, record):
            messages.append(record.getMessage())

    class Partitions(TrainerCallback):  # during training, outside any forward: empty ZeRO-3 partitions
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            params = list(model.parameters())
            seen.update(params=len(params), zero3_partitioned=sum(hasattr(p, "ds_numel") and p.numel() == 0
                                                                  for p in params))

    trl_logger, keep = logging.getLogger("logitsam.trl"), Keep()
    level = trl_logger.level
    trl_logger.setLevel(logging.INFO)
    trl_logger.addHandler(keep)
    try:
        trainer = LogitsSAMDPOTrainer(model=str(workdir / "model"), args=args, train_dataset=Dataset.from_list(rows),
                                      processing_class=AutoTokenizer.from_pretrained(str(workdir / "model")),
                                      callbacks=[Partitions()])
        trainer.train()
    finally:
        trl_logger.removeHandler(keep)
        trl_logger.setLevel(level)
    trainer.save_model(str(out))
    if trainer.args.process_index == 0:
        log = trainer.state.log_history[0]
        result = {"world_size": trainer.args.world_size, "deepspeed": trainer.is_deepspeed_enabled,
                  "ref_model": type(trainer.ref_model).__name__, "head_checked": trainer._head_checked,
                  "log": log, "messages": messages, **seen}
        (out / "result.json").write_text(json.dumps(result))
    return trainer


if __name__ == "__main__":
    run(*sys.argv[1:4])
    # every rank is done (rank 0 has written result.json), then leave without interpreter teardown: DeepSpeed's and
    # gloo's destructors at exit aborted one rank now and then (SIGABRT after a finished run, seen once in CI)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
