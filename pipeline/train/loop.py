"""The one training loop shared by every stage.

Plain PyTorch per worker; Ray appears only at the edges (``prepare_model``, ``get_checkpoint``,
``report``), so :func:`run_loop` can be called directly in tests. Each worker loads its part of the
split once as a uint8 tensor on its device (memory mode) or receives it batch by batch from its Ray
Data shard (stream mode, :mod:`pipeline.data.streaming`), and augments per batch there; within an
epoch nothing waits on the host (sums stay on the device until the epoch ends).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from pipeline import checkpoints
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.data.batches import batch_for_eval
from pipeline.data.loading import SplitTensors as Split
from pipeline.data.loading import load_split, read_manifest
from pipeline.data.streaming import epoch_batches, split_paths
from pipeline.evaluate import Scores, score
from pipeline.models import prefers_channels_last
from pipeline.plan import StagePlan
from pipeline.train.steps import Task, TrainBatch, build_task, effective_lr, unwrap


def _seed_for(seed: int, epoch: int, rank: int) -> int:
    # Seeding per (seed, epoch, rank) makes a resumed run draw exactly what an uninterrupted one would.
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def _amp_dtype(amp: str, device: torch.device):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@dataclass
class LoopContext:
    """Everything the loop needs from outside; Ray fills it in ``train_worker``, tests by hand."""

    rank: int
    world: int
    device: torch.device
    report: Callable[[dict[str, Any], str | None], None]  # (metrics, checkpoint dir or None)
    resume_dir: str | None = None
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    print_fn: Callable[[str], None] = print
    # Called as after_epoch(epoch, rank) once an epoch is reported: the reliability tests kill a
    # worker from here; production passes nothing.
    after_epoch: Callable[[int, int], None] | None = None
    # Rank 0's channel to the driver's progress display (pipeline.console); without one, rank 0
    # prints a line per epoch itself.
    progress: Any = None
    # Stream mode: this worker's Ray Data shard of the training split (ray.train.get_dataset_shard);
    # None: the worker loads its part into memory.
    train_stream: Any = None


def share_rank0_buffers(model: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them only at
    the next training forward, so after an epoch each rank holds its own last update; evaluated so,
    the validation score would not be that of the model rank 0 saves (seen: 94.5 % per epoch
    against 93.9 % re-measured on the published Lite0)."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def evaluate(task, model, val, tcfg: TrainConfig, crop: int, num_classes: int, world: int, batch: int = 256) -> dict[str, Any]:
    """The validation metrics (``val_top1``, per head, the teacher's, agreement, KL, loss) over the
    whole split, reduced across ranks, all with rank 0's weights and buffers (the model it
    checkpoints); scored by the same :class:`~pipeline.evaluate.Scores` as ``evaluate`` and the report."""
    share_rank0_buffers(model, world)
    scores = Scores(num_classes, with_kl=task.reports_kl)
    score(lambda x, rows: task.eval_outputs(model, x, rows), lambda u8: batch_for_eval(u8, tcfg, crop, task.mean, task.std),
          val.images, val.labels, scores, batch, kl=task.eval_kl if task.reports_kl else None)
    scores.all_reduce(world)
    result = scores.result()
    metrics = {f"val_{k}": v for k, v in result.items() if k != "confusion"}
    metrics["_confusion"] = result["confusion"]
    return metrics


@dataclass
class _Run:
    """The state of one worker's training run, built by :func:`_start`."""

    plan: StagePlan
    tcfg: TrainConfig
    task: Task
    model: torch.nn.Module
    train: Split | None  # None in stream mode
    val: Split
    manifest: dict[str, Any]
    crop: int
    channels_last: bool
    per_worker: int  # batch size on this worker
    steps_per_epoch: int
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    params: list[torch.nn.Parameter]
    meta: dict[str, Any]  # what every checkpoint's meta.json starts from
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch; travels inside every checkpoint

    @property
    def epochs(self) -> int:
        return self.task.opt_cfg.epochs

    def autocast(self):
        device = self.val.images.device
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None)


def run_loop(cfg: PipelineConfig, plan: StagePlan, ctx: LoopContext) -> None:
    """Train the planned stage on this worker's part of the data; report every epoch, checkpoint every k."""
    run = _start(cfg, plan, ctx)
    # A resumed run that had already finished reports its final state again without training.
    rerun_last = run.start_epoch >= run.epochs
    last_val: dict[str, Any] = {}
    pending_logs: list[tuple[dict[str, float], int]] = []
    for epoch in range(min(run.start_epoch, run.epochs - 1), run.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator(device=ctx.device)
        gen.manual_seed(_seed_for(run.tcfg.seed, epoch, ctx.rank))
        torch.manual_seed(_seed_for(run.tcfg.seed, epoch, ctx.rank) + 1)
        run.task.start_epoch(epoch)
        metrics, diverged = _train_epoch(run, ctx, epoch, gen, skip=rerun_last)
        if diverged:
            # Every rank sees the summed count, so all stop together; nothing of this epoch is logged,
            # checkpointed or published, and the driver turns the report into a clear error.
            ctx.report(diverged, None)
            return
        last_epoch = epoch + 1 == run.epochs
        do_ckpt = last_epoch or (epoch + 1) % run.tcfg.checkpoint_every == 0
        if do_ckpt or (epoch + 1) % run.tcfg.eval_every == 0 or not last_val:
            run.model.eval()
            with run.autocast():
                last_val = evaluate(run.task, run.model, run.val, run.tcfg, run.crop, run.manifest["num_classes"], ctx.world)
        metrics.update({k: v for k, v in last_val.items() if not k.startswith("_")})
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if ctx.rank == 0 and ctx.progress is not None:
            ctx.progress.epoch(metrics, run.steps_per_epoch)
        elif ctx.rank == 0:
            ctx.print_fn(f"[{plan.stage}] epoch {epoch + 1}/{run.epochs} loss {metrics['train_loss']:.4f} "
                         f"train_top1 {metrics['train_top1']:.3f} val_top1 {metrics.get('val_top1', float('nan')):.3f} "
                         f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.0f} img/s {metrics['epoch_time_s']:.1f}s")
        pending_logs.append(({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1))
        run.history = [h for h in run.history if h["epoch"] < epoch + 1] + [dict(metrics)]
        if do_ckpt:
            # MLflow gets an epoch's metrics only once a checkpoint covers it: a restart re-runs the
            # epochs after the last checkpoint, and their metrics must not be logged twice.
            if ctx.rank == 0 and ctx.log_metrics:
                for m, step in pending_logs:
                    ctx.log_metrics(m, step)
            pending_logs = []
            _checkpoint_and_report(run, ctx, epoch, gen, metrics, last_val)
        else:
            ctx.report(metrics, None)
        if ctx.after_epoch:
            ctx.after_epoch(epoch + 1, ctx.rank)


def _start(cfg: PipelineConfig, plan: StagePlan, ctx: LoopContext) -> _Run:
    """Build the task, load this worker's data, size the schedule, create the optimiser; resume if asked."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    tcfg = plan.train_config(cfg)
    device, world = ctx.device, ctx.world
    manifest = read_manifest(plan.shard_dir)
    torch.manual_seed(_seed_for(tcfg.seed, -1, 0))  # same initial weights on every rank
    task = build_task(cfg, plan, manifest, device)
    ocfg = task.opt_cfg
    model = task.model.to(device)
    channels_last = tcfg.channels_last == "on" or (tcfg.channels_last == "auto" and prefers_channels_last(model, device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.train_stream is None:
        train = load_split(plan.shard_dir, "train", ctx.rank, world, device)
        task.bind_train_part(train.paths, device, rows=train.rows)
    else:  # streamed batches carry their row numbers in the split, so tasks index the whole split
        # on the host (teacher views read file by file as batches need them); each batch's rows go
        # to the device
        train = None
        task.bind_train_part(split_paths(plan.shard_dir, "train"), torch.device("cpu"), streamed=True)
    val = load_split(plan.shard_dir, "val", ctx.rank, world, device)
    task.bind_val_part(val.paths, device)
    n_train = manifest["split_sizes"]["train"]
    per_worker = min(max(1, ocfg.batch_size // world), max(1, n_train // world))
    # Equal on every rank (DDP needs that). A rank's part holds at least n_train // world rows in
    # either mode (stream mode's equal split gives each exactly that many).
    steps_per_epoch = max(1, (n_train // world) // per_worker)

    lr = effective_lr(ocfg)
    optimizer = create_optimizer_v2(task.optimizer_target(model), opt=ocfg.optimizer, lr=lr, weight_decay=ocfg.weight_decay)
    warmup = ocfg.warmup_steps if ocfg.warmup_steps is not None else int(round(ocfg.warmup_epochs * steps_per_epoch))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, steps_per_epoch * ocfg.epochs), lr_min=ocfg.min_lr,
                                  warmup_t=warmup, warmup_lr_init=lr * 1e-3 if warmup else lr, t_in_epochs=False)
    amp_dtype = _amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    crop = task.crop
    meta = {**task.meta, "stage": plan.stage, "class_names": manifest["class_names"], "num_classes": manifest["num_classes"],
            "image_size": manifest["image_size"], "resize_mode": manifest["resize_mode"], "input_size": crop,
            "eval_transform": tcfg.eval_transform}
    run = _Run(plan, tcfg, task, model, train, val, manifest, crop, channels_last, per_worker, steps_per_epoch,
               optimizer, scheduler, scaler, amp_dtype, [], meta)
    if ctx.resume_dir:
        _resume(run, ctx)
    run.model = ctx.prepare_model(run.model)
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    return run


def _resume(run: _Run, ctx: LoopContext) -> None:
    """Weights, optimiser, schedule and history from the checkpoint Ray hands a restarted worker."""
    run.history = checkpoints.read_meta(ctx.resume_dir).get("history", [])
    weights = os.path.join(ctx.resume_dir, checkpoints.MODEL_FILE)
    run.model.load_state_dict(torch.load(weights, map_location=ctx.device, weights_only=True))
    state = checkpoints.load_train_state(ctx.resume_dir)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.global_step = state["epoch"] + 1, state["global_step"]
    ctx.print_fn(f"[{run.plan.stage}] resuming after epoch {state['epoch'] + 1} (step {run.global_step})")
    if ctx.progress is not None and ctx.rank == 0:
        ctx.progress.resumed(state["epoch"] + 1)


def _train_epoch(run: _Run, ctx: LoopContext, epoch: int, gen: torch.Generator,
                 skip: bool) -> tuple[dict[str, Any], dict[str, float] | None]:
    """One pass over this worker's rows; returns (the epoch's training metrics, a divergence report or None).
    Sums stay on the device until the epoch ends, then one all-reduce packs them all."""
    device, task = ctx.device, run.task
    t0 = time.perf_counter()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct, n, non-finite steps
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step here (no sync per step)
    parts: dict[str, torch.Tensor] = {}
    if not skip:
        task.set_train_mode(run.model)
        for step, batch in enumerate(_epoch_batches(run, ctx, epoch, gen)):
            idx = batch.idx
            out = _optimizer_step(run, batch)
            b = float(len(idx))
            finite = torch.isfinite(out["loss"].detach())
            first_bad = torch.where(finite | (first_bad >= 0), first_bad, torch.full_like(first_bad, step))
            correct = (out["logits"].argmax(-1) == out.get("target", batch.targets)).sum().double()
            sums += torch.stack([out["loss"].detach().double() * b, correct,
                                 torch.tensor(b, dtype=torch.float64, device=device), (~finite).double()])
            for k, v in out.items():
                if k.startswith("loss_"):
                    parts[k] = parts.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.double() * b
            if ctx.progress is not None and ctx.rank == 0:
                ctx.progress.step(epoch, step, run.steps_per_epoch, lambda: sums[0] / sums[2].clamp(min=1.0))
    keys = sorted(parts)
    packed = _all_reduce(torch.cat([sums, torch.stack([parts[k] for k in keys]) if keys else sums[:0]]), ctx.world).cpu()
    if packed[3].item() > 0:
        bad_step = int(first_bad.item())
        return {}, {"epoch": epoch + 1, "diverged": 1.0, "nonfinite_steps": packed[3].item(),
                    "first_nonfinite_step": float(bad_step + 1 if bad_step >= 0 else -1)}
    n = max(packed[2].item(), 1.0)
    metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": packed[0].item() / n, "train_top1": packed[1].item() / n,
                               "lr": run.optimizer.param_groups[-1]["lr"],
                               "images_per_s": packed[2].item() / max(time.perf_counter() - t0, 1e-9)}
    metrics.update({f"train_{k}": packed[4 + i].item() / n for i, k in enumerate(keys)})
    return metrics, None


def _epoch_batches(run: _Run, ctx: LoopContext, epoch: int, gen: torch.Generator) -> Iterator[TrainBatch]:
    """The epoch's ``steps_per_epoch`` batches: a fresh permutation of this worker's part in memory
    mode; in stream mode its Ray Data shard, read to the end (Ray's split waits for every rank to
    finish an epoch before the next one starts)."""
    if ctx.train_stream is None:
        order = torch.randperm(len(run.train), generator=gen, device=ctx.device)
        for step in range(run.steps_per_epoch):
            idx = order[(step * run.per_worker) % max(len(run.train), 1) :][: run.per_worker]
            yield TrainBatch(run.train.images, run.train.labels, idx, gen, run.channels_last)
        return
    shape = tuple(run.manifest["image_shape"])
    stream = epoch_batches(ctx.train_stream, run.per_worker, shape, ctx.device, _seed_for(run.tcfg.seed, epoch, ctx.rank))
    for step, (images, labels, rows) in enumerate(stream):
        if step < run.steps_per_epoch:
            idx = torch.arange(len(labels), device=ctx.device)
            yield TrainBatch(images, labels, idx, gen, run.channels_last, rows=rows)


def _optimizer_step(run: _Run, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """The task's forward and loss under autocast, then backward, clipping and the optimiser step."""
    with run.autocast():
        out = run.task.train_step(run.model, batch)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(out["loss"]).backward()
    if run.task.opt_cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.params, run.task.opt_cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.global_step += 1
    run.scheduler.step_update(num_updates=run.global_step)
    return out


def _checkpoint_and_report(run: _Run, ctx: LoopContext, epoch: int, gen: torch.Generator, metrics: dict[str, Any],
                           last_val: dict[str, Any]) -> None:
    """Rank 0 writes weights, training state and history; every rank reports (Ray needs all of them)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = None
        if ctx.rank == 0:
            train_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                           "scaler": run.scaler.state_dict(), "epoch": epoch, "global_step": run.global_step,
                           "rng_torch": torch.get_rng_state(), "rng_augment": gen.get_state().cpu()}
            meta_now = {**run.meta, "epoch": epoch + 1, "val_top1": metrics.get("val_top1"), "confusion": last_val.get("_confusion"),
                        "history": run.history}
            checkpoints.save(tmp, unwrap(run.model).state_dict(), meta_now, train_state)
            ckpt_dir = tmp
        ctx.report(metrics, ckpt_dir)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every ``ray.train.report`` of every rank at INFO, metrics dict and checkpoint
    path included (hundreds of characters a line), through a logger named by its file's path, so
    ``LoggingConfig`` does not reach it. The driver shows the same numbers once, as progress."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _console_line(message: str) -> None:
    """One line on the worker's real stdout, which Ray streams to the driver. Ray Train patches
    ``print`` to send each line both there and to the root logger: every epoch line showed twice."""
    print(message, file=sys.__stdout__, flush=True)


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the stage stops without publishing anything."""


def check_diverged(stage: str, metrics: dict[str, Any] | None, opt_key: str) -> None:
    """Raise :class:`TrainingDiverged` when the workers' last report says the loss went non-finite."""
    if metrics and metrics.get("diverged"):
        step = int(metrics.get("first_nonfinite_step", -1))
        where = f"epoch {int(metrics['epoch'])}" + (f", step {step} of rank 0" if step > 0 else "")
        raise TrainingDiverged(
            f"{stage}: the loss became NaN or infinite in {where} ({int(metrics.get('nonfinite_steps', 0))} step(s) across workers); "
            f"nothing was published or registered. Lower {opt_key}.lr, set {opt_key}.grad_clip, or use train.amp=off")


@contextmanager
def _checkpoint_directory(checkpoint) -> Iterator[str]:
    """The checkpoint's files in a local directory of this process's own.

    Not ``Checkpoint.as_directory``: for a checkpoint in an object store it shares one temporary
    folder per checkpoint among the processes of a node, and a rank that arrives after another
    finished downloading downloads again into that folder, truncating files the other is reading
    (the two-node test saw ``train_state.pt`` end early on resume)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    local = tempfile.mkdtemp(prefix="resume-")
    try:
        yield checkpoint.to_directory(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from pipeline.tracking import EpochLogger

    cfg = PipelineConfig.model_validate(config["cfg"])
    if not config.get("verbose"):
        _quiet_ray_train_reports()
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.ray.cpus_per_worker)))
    logger = EpochLogger(config.get("tracking_uri"), config.get("run_id"), cfg.tracking.fail_fast, config.get("unsent_path")) if rank == 0 else None

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    checkpoint = ray.train.get_checkpoint()
    resume_ctx = _checkpoint_directory(checkpoint) if checkpoint else None
    resume_dir = resume_ctx.__enter__() if resume_ctx else None
    try:
        stream = ray.train.get_dataset_shard("train") if config.get("data_mode") == "stream" else None
        ctx = LoopContext(rank, world, device, report, resume_dir, ray.train.torch.prepare_model,
                          logger.log if logger else None, print_fn=_console_line, after_epoch=config.get("after_epoch"),
                          progress=config.get("progress"), train_stream=stream)
        run_loop(cfg, config["plan"], ctx)
    finally:
        if resume_ctx:
            resume_ctx.__exit__(None, None, None)
        if logger:
            logger.close()
