"""Every rank evaluates the model rank 0 saves, BatchNorm statistics included."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    from pipeline.train.loop import share_rank0_buffers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        model.train()
        # each rank's last training forward leaves its own running statistics, as DDP does after an epoch
        torch.manual_seed(rank)
        model(torch.randn(8, 3, 5, 5) * (rank + 1))
        before = model[1].running_var.clone()
        share_rank0_buffers(model, 2)
        results[rank] = (before, model[1].running_var.clone(), int(model[1].num_batches_tracked))
    finally:
        dist.destroy_process_group()


def test_evaluation_uses_rank0_batchnorm_statistics_on_every_rank():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
        (before0, after0, n0), (before1, after1, n1) = results[0], results[1]
    assert not torch.allclose(before0, before1)  # the ranks really differed
    assert torch.equal(after0, before0) and torch.equal(after1, before0) and n0 == n1 == 1
