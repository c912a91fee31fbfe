"""Every rank evaluates the model rank 0 saves, BatchNorm statistics included."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
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
        torch.save((before, model[1].running_var.clone(), int(model[1].num_batches_tracked)), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluation_uses_rank0_batchnorm_statistics_on_every_rank(tmp_path):
    # Fresh interpreters (spawn) and files, no forked helper process: this pytest process is also a
    # Ray driver, whose gRPC state must not be forked.
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    (before0, after0, n0), (before1, after1, n1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(before0, before1)  # the ranks really differed
    assert torch.equal(after0, before0) and torch.equal(after1, before0) and n0 == n1 == 1
