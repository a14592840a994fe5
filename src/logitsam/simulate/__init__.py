"""Peak memory of one training step at 7B scale, simulated on a CPU: ``logitsam simulate``.

The whole step runs on a real model shape with random weights (``shapes.SHAPES``) under
``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor has its shape, dtype and device, and no
storage. The step is the backbone forward, logitsam's head pass (``train._inside.head_inside_forward``
with ``core.logits_sam`` or ``core.sequence_logps`` and the sigmoid DPO loss), backward and a fused AdamW
step (``step.simulate_step``). torch's ``MemTracker`` (one process) or ``FSDPMemTracker`` (FSDP2 on a fake
process group, rank 0's view) counts each tensor's bytes by category, at every op. Nothing is allocated:
a Qwen2.5-7B step takes 10 to 25 seconds and a few hundred MiB of host memory.

Variants: DPO (rho 0) or logits-SAM; a dense, chunked (512 tokens x 8,192 vocabulary per block) or
``auto`` head (``train.run.resolve_chunk_size``: chunked when one micro-batch's fp32 logits, rows x T x V
x 4 bytes, exceed 1 GiB); float32 master weights under bf16 autocast, or bf16 weights.

Trainers (``--trainer``): ``ours`` (the step above, precomputed reference log-probs), ``trl-subclass``
(``LogitsSAMDPOTrainer`` at ``LogitsSAMConfig``'s defaults: logits-SAM at rho 1e-4, ``sam_chunk_size`` auto) and
``trl`` (TRL 1.16's ``DPOTrainer`` at ``DPOConfig``'s defaults, its fused head); the two TRL trainers keep TRL's
default live reference model: N more parameters, and autocast's bf16 copies of them during the reference's
forward (``step`` module docstring). One process only. TRL's fused head runs its CPU path (every position
scored, torch fold temporaries its GPU Triton kernels do not allocate), so its head phases read high.

Analytic budget per device (``report.budget``): N parameters, W ranks (1 without FSDP), b = 4 bytes for
float32 master weights or 2 for bf16 weights, R rows of T tokens, n completion tokens, L layers,
hidden size d, vocabulary V:

    parameters            N b / W
    gradients             N b / W                      (all present at the end of backward)
    AdamW                 2 N b / W + 4 k              (exp_avg, exp_avg_sq in the weights' dtype; k float32 steps)
    autocast weight cache 2 N                          (one process, fp32 weights: autocast keeps the bf16 copy
                                                        of every weight it cast until the forward ends)
    layer inputs          L R T d r                    (gradient checkpointing keeps each layer's input: the
                                                        residual stream, r = 4 under autocast over fp32
                                                        weights, 2 when the weights are bf16 or FSDP2 gathers
                                                        them in bf16)
    dense head            n V 4 per fp32 logits copy   (the clean pass, its log-softmax and the statistics
                                                        each hold one or more)
    chunked head block    chunk x vocab_chunk x 4      (one fp32 logits block, a few alive at a time)
    logits-SAM eps        V d 2                        (bf16 compute: eps is kept as a bf16 unit direction
                                                        plus float32 scales; float32 compute: V d 4)
    gathered head (FSDP2) V d 2                        (the root group's bf16 unsharded head and embedding)

What the trackers do and do not count:
- They see every op's inputs and outputs at the dispatcher, including the ops inside a custom autograd
  ``Function`` run under ``no_grad`` (the chunked head's forward and backward), so those temporaries are
  counted. Only their column can be off: an op counts as ``activations`` unless the tracker believes it is in
  backward (``temps``), so the logits-SAM clean pass's own ``autograd.grad`` inside the forward lands in
  activations, and recomputation under checkpointing can swap the two.
- They do not see memory a kernel allocates for itself. The allocator cross-check found one that matters:
  ``aten.logsumexp`` (the dense head's statistics) holds ``exp(x - max)``, an (n, V) float32 buffer, inside
  its kernel; ``step.KernelScratch`` adds a stand-in of that size while it runs. Others stay uncounted:
  SDPA's per-thread blocks on CPU, cuBLAS workspaces and NCCL buffers on GPU (tens to hundreds of MiB).
- Nor the caching allocator's rounding and fragmentation: on a GPU, reserved memory exceeds the peak of
  allocated memory, which is what this counts.
- CPU autocast stands in for CUDA autocast: both cast the matmuls to bf16 and cache the bf16 copies of
  float32 weights alike, but their lists of float32 ops differ in places. SDPA on CPU keeps no (T x T)
  scores, as the GPU's flash and memory-efficient kernels do not.

Cross-check (``tests/test_simulate.py``): at a tiny Llama shape the same step on real tensors grows over its
resting state by what the simulation says, to 0.1-0.2 % of the CPU allocator's own count
(``torch.profiler`` memory events), for DPO and logits-SAM, dense and chunked. Without ``KernelScratch`` the
dense head's growth was 17 % short. RuntimeEstimator is not used: its roofline model reads the GPU's
peak FLOP/s and bandwidth through CUDA, which this machine does not have.

Time: ``logitsam simulate --head all`` (the five shapes, dense and chunked, DPO and logits-SAM: 20 steps)
took 4 min 17 s in one process and 7 min with ``--fsdp 8``, on a shared 2-core CPU in under 0.7 GB of
memory. It is that fast because the trackers' per-module peaks, Python over every module at every op, are
not kept (``step.Phases``); with them a single Qwen2.5-7B step took minutes.
"""

from __future__ import annotations

# Names only: `logitsam -h` builds its parser from them without importing transformers. The code lives in
# `shapes` (configs), `step` (one tracked step) and `report` (runs, budget, tables).
DEFAULT_MODELS = ("qwen2.5-7b", "llama-3-8b", "mistral-7b", "gemma-2-2b", "pythia-2.8b")
MODELS = (*DEFAULT_MODELS, "tiny-llama")  # the keys of shapes.SHAPES
HEADS = ("dense", "chunked", "auto")
LOSSES = ("dpo", "logits-sam")
PRECISIONS = ("bf16-autocast", "bf16")
# whose training step: logitsam's PreferenceTrainer (precomputed reference), LogitsSAMDPOTrainer at its defaults,
# TRL 1.16's own DPOTrainer at its defaults (both with TRL's live reference model)
TRAINERS = ("ours", "trl-subclass", "trl")
