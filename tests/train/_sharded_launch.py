"""torchrun entry of the sharded-training tests: ``logitsam train`` with a few test-only switches.

- Always: the FSDP plugin is honoured on CPU processes. accelerate 1.15 enables FSDP only for accelerator
  distributed types (``AcceleratorState`` keeps ``MULTI_CPU`` and quietly runs DDP on CPU); torch's FSDP2 itself
  runs on CPU with gloo, so here the state is switched to FSDP as it would be on GPUs.
- ``LOGITSAM_TEST_LAYOUT=root_reshard``: the FSDP2 layout accelerate built before its head/tail group (``fully_shard``
  on every auto-wrapped block, then on the root, all with ``reshard_after_forward=True``): the head lives in the
  root's group and is a sharded DTensor again once the root's forward has returned.
- ``LOGITSAM_TEST_HEAD_AFTER_FORWARD=1``: the flow before the head moved inside the wrapper's forward: the backbone
  through the wrapper (``forward_hidden``), then logits-SAM on ``lm_head_of(model)`` after it returned.
- ``LOGITSAM_TEST_DEEPSPEED=1`` (with ``DS_ACCELERATOR=cpu`` and ``--deepspeed``): DeepSpeed on CPU processes.
  accelerate 1.15 finds no accelerator backend there and records a 1-process run although DeepSpeed initialised
  torch.distributed for 2 (its gathers then fail); the process count is taken from torch.distributed. DeepSpeed's
  shared-memory comm op is not built (a JIT compile).
- ``LOGITSAM_TEST_NOISE_OTHER_RANKS=1``: after loading, ranks > 0 overwrite every loaded model's weights with noise,
  standing for CPU-RAM-efficient loading where only rank 0 is sure to hold real weights (transformers before 5 left
  the other ranks' unloaded) until FSDP2 broadcasts rank 0's at preparation.

After training, rank 0 writes ``sharding.json`` (which parameters are DTensors or empty ZeRO-3 partitions, the
policy's and, under ``ref``, a separate reference model's) into the output directory.
"""

import json
import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared CPU workarounds
from _cpu_workarounds import deepspeed_on_cpu  # noqa: E402


def _fsdp_on_cpu():
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later AcceleratorState() calls

    AcceleratorState.__init__ = patched


def _noise_other_ranks():
    import torch

    import logitsam.models
    import logitsam.train.run

    load = logitsam.models.load_model

    def patched(*args, **kwargs):
        model = load(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) > 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_()
        return model

    logitsam.models.load_model = logitsam.train.run.load_model = patched


def _root_reshard_layout():
    import accelerate.accelerator
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from torch.distributed.fsdp import fully_shard

    def prepare(accelerator, model):
        plugin = accelerator.state.fsdp_plugin
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy is not None and policy(module):
                fully_shard(module, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        return model

    accelerate.accelerator.fsdp2_prepare_model = prepare


def _head_after_forward():
    from logitsam.core import logits_sam
    from logitsam.core.head import shift_labels
    from logitsam.models import forward_hidden, lm_head_of
    from logitsam.train.trainer import PreferenceTrainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = shift_labels(inputs["labels"])
        ref_chosen, ref_rejected = self._reference_logps(inputs, labels)
        model = model.module if type(model).__name__ == "DeepSpeedEngine" else model  # ZeRO-3 hooks sit on modules
        hidden = forward_hidden(model, inputs["input_ids"], inputs["attention_mask"])  # the wrapper has returned
        loss, _ = logits_sam(hidden, lm_head_of(model), labels, self._loss_fn(ref_chosen, ref_rejected, labels, {}),
                             self.sam_rho, norm=self.sam_norm, variant=self.sam_variant, **self.chunks)
        return loss

    PreferenceTrainer.compute_loss = compute_loss


def _report_sharding():
    from torch.distributed.tensor import DTensor

    from logitsam.models import lm_head_of
    from logitsam.train.trainer import PreferenceTrainer

    train = PreferenceTrainer.train

    def patched(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        if self.args.process_index == 0:
            params = dict(self.model.named_parameters())
            info = {"fsdp": self.is_fsdp_enabled, "params": len(params),
                    "dtensor_params": sum(isinstance(p, DTensor) for p in params.values()),
                    "head_is_dtensor": isinstance(lm_head_of(self.model).weight, DTensor),
                    "zero3_partitioned": sum(hasattr(p, "ds_numel") and p.numel() == 0 for p in params.values())}
            if self.ref_model is not None:
                ref = dict(self.ref_model.named_parameters())
                info["ref"] = {"type": type(self.ref_model).__name__, "params": len(ref),
                               "dtensor_params": sum(isinstance(p, DTensor) for p in ref.values()),
                               "zero3_partitioned": sum(hasattr(p, "ds_numel") and p.numel() == 0
                                                        for p in ref.values()),
                               "device": str(next(iter(ref.values())).device)}
            (Path(self.args.output_dir) / "sharding.json").write_text(json.dumps(info))
        return result

    PreferenceTrainer.train = patched


if __name__ == "__main__":
    _fsdp_on_cpu()
    if os.environ.get("LOGITSAM_TEST_DEEPSPEED") == "1":
        deepspeed_on_cpu()
    if os.environ.get("LOGITSAM_TEST_NOISE_OTHER_RANKS") == "1":
        _noise_other_ranks()
    if os.environ.get("LOGITSAM_TEST_LAYOUT") == "root_reshard":
        _root_reshard_layout()
    if os.environ.get("LOGITSAM_TEST_HEAD_AFTER_FORWARD") == "1":
        _head_after_forward()
    _report_sharding()
    from logitsam.cli import main

    main(sys.argv[1:])
