"""norm="global" across two real (gloo, CPU) processes: the squared norm is averaged over ranks."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from logitsam.core import FullSAM, logits_sam, sam_perturbation


def _worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.full((3, 2), float(rank + 1))  # rank 0: ||g||^2 = 6, rank 1: 24
        w = torch.ones(3, 2)
        _, local, _ = sam_perturbation(g, w, 0.1, norm="local")
        eps, glob, _ = sam_perturbation(g, w, 0.1, norm="global")
        # logits-SAM: a loss whose head gradient differs per rank
        torch.manual_seed(rank)
        head = torch.nn.Linear(4, 5, bias=False)
        torch.manual_seed(100)
        head.weight.data = torch.randn(5, 4)
        hidden = torch.randn(2, 3, 4) * (rank + 1)
        labels = torch.randint(0, 5, (2, 3))
        _, s_local = logits_sam(hidden, head, labels, lambda o: -o.logps.sum(), 0.1, norm="local")
        _, s_global = logits_sam(hidden, head, labels, lambda o: -o.logps.sum(), 0.1, norm="global")
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.full((2,), float(rank + 1))
        full_norm = FullSAM([p], 0.1, norm="global").first_step()
        results[rank] = (float(local), float(glob), eps.clone(), s_local["grad_norm"], s_global["grad_norm"],
                         full_norm)
    finally:
        dist.destroy_process_group()


def test_global_norm_is_mean_over_ranks(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert abs(r0[0] ** 2 - 6.0) < 1e-5 and abs(r1[0] ** 2 - 24.0) < 1e-5  # local norms differ
    expected = ((6.0 + 24.0) / 2) ** 0.5
    assert abs(r0[1] - expected) < 1e-6 and abs(r1[1] - expected) < 1e-6
    torch.testing.assert_close(r0[2], torch.full((3, 2), 0.1 / expected))
    torch.testing.assert_close(r1[2], torch.full((3, 2), 0.2 / expected))
    # logits-SAM and full SAM use the same rule: sqrt(mean of the ranks' squared norms)
    mean_sq = (r0[3] ** 2 + r1[3] ** 2) / 2
    assert r0[3] != r1[3]
    assert abs(r0[4] - mean_sq**0.5) < 1e-5 and abs(r1[4] - mean_sq**0.5) < 1e-5
    assert abs(r0[5] - ((2 + 8) / 2) ** 0.5) < 1e-6 and r0[5] == r1[5]
