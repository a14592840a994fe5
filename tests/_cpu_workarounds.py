"""CPU-only workarounds shared by the tests' multi-process launchers (``tests/train/_sharded_launch.py``,
``tests/trl/_trl_zero3_launch.py``); imported by path, never by the library."""

import os


def deepspeed_on_cpu():
    """DeepSpeed on CPU processes (with ``DS_ACCELERATOR=cpu``).

    accelerate 1.15 finds no accelerator backend there and records a 1-process run although DeepSpeed initialised
    torch.distributed for 2 (its gathers then fail): the process count is taken from torch.distributed. DeepSpeed's
    shared-memory comm op is not built (a JIT compile).
    """
    import importlib

    import torch.distributed as dist
    from accelerate.state import PartialState

    # (``import deepspeed.comm.torch as m`` would bind torch itself: deepspeed.comm re-exports it as ``torch``)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    init = PartialState.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if dist.is_initialized() and self.num_processes != dist.get_world_size():
            self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
            self.local_process_index, self.backend = int(os.environ["LOCAL_RANK"]), "gloo"

    PartialState.__init__ = patched
