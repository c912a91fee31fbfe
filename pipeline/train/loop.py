"""The one training loop shared by every stage.

Plain PyTorch per worker; Ray appears only at the edges (``prepare_model``, ``get_checkpoint``,
``report``), so :func:`run_loop` can be called directly in tests. Each worker loads its part of the
split once as a uint8 tensor on its device and augments per batch there; within an epoch nothing
waits on the host (sums stay on the device until the epoch ends).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import checkpoints
from pipeline.config import PipelineConfig, TrainConfig, stage_train
from pipeline.data import augment
from pipeline.data.loading import load_split, read_manifest
from pipeline.models import prefers_channels_last
from pipeline.train.steps import build_task, effective_lr, unwrap


def batch_for_training(images, idx, tcfg: TrainConfig, crop: int, mean, std, gen, channels_last: bool) -> torch.Tensor:
    """Images ``idx`` of the stored uint8 tensor -> an augmented, normalised float batch."""
    if tcfg.augment == "crop_flip":
        return augment.to_float(augment.random_crop_flip(images, crop, index=idx, generator=gen), mean, std, channels_last)
    x = augment.to_float(images[idx], mean, std, channels_last)
    if tcfg.augment == "inception":
        return augment.random_resized_crop(x, crop, scale=tuple(tcfg.inception_scale), generator=gen)
    return augment.resize(x, crop)


def batch_for_eval(images, tcfg: TrainConfig, crop: int, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Stored uint8 images -> the evaluation input: resized (Keras DeiT) or centre-cropped to ``crop``."""
    if tcfg.eval_transform == "center_crop":
        return augment.to_float(augment.center_crop(images, crop), mean, std, channels_last)
    return augment.resize(augment.to_float(images, mean, std, channels_last), crop)


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
    # Fault injection for the reliability tests: {"epoch": k, "marker": path} kills this worker
    # process once, right after epoch k was reported (the marker file makes it happen only once).
    fault: dict[str, Any] | None = None


def evaluate(task, model, val, tcfg: TrainConfig, crop: int, num_classes: int, world: int, batch: int = 256) -> dict[str, float]:
    """Loss, accuracy per head, teacher accuracy and agreement over the whole split, reduced across ranks."""
    device = val.images.device
    keys: list[str] = []
    sums: torch.Tensor | None = None
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    for i in range(0, max(len(val), 1), batch):
        x = batch_for_eval(val.images[i : i + batch], tcfg, crop, task.mean, task.std)
        y = val.labels[i : i + batch]
        if len(y) == 0:  # a rank without validation rows still learns the keys, so all ranks reduce alike
            out = task.eval_outputs(model, torch.zeros((1, *x.shape[1:]), device=device))
            out = {k: v[:0] for k, v in out.items()}
        else:
            out = task.eval_outputs(model, x)
        if sums is None:
            keys = ["count", "loss"] + [f"correct:{k}" for k in out] + (["agree"] if "teacher" in out else [])
            keys += ["kl"] if "teacher" in out and hasattr(task, "kl") else []
            sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
        vals = [float(len(y)), F.cross_entropy(out["logits"].float(), y, reduction="sum").double() if len(y) else 0.0]
        vals += [(out[k].argmax(-1) == y).sum().double() for k in out]
        if "teacher" in out:
            vals.append((out["logits"].argmax(-1) == out["teacher"].argmax(-1)).sum().double())
        if "kl" in keys:  # the distillation loss on un-mixed validation images
            vals.append(task.kl(out["logits"].float(), out["teacher"]).double() * len(y) if len(y) else 0.0)
        sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in vals])
        pred = out["logits"].argmax(-1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).double()
    packed = _all_reduce(torch.cat([sums, confusion]), world).cpu()
    n = max(packed[0].item(), 1.0)
    metrics = {"val_count": packed[0].item(), "val_loss": packed[1].item() / n}
    for j, k in enumerate(keys[2:], start=2):
        name = k.split(":", 1)[-1]
        label = {"logits": "val_acc", "teacher": "val_teacher_acc", "agree": "val_agreement", "kl": "val_kl"}.get(
            name, f"val_acc_{name.removeprefix('logits_')}")
        metrics[label] = packed[j].item() / n
    metrics["_confusion"] = packed[len(keys) :].view(num_classes, num_classes).tolist()
    return metrics


def run_loop(cfg: PipelineConfig, stage: str, shard_dir: str, ctx: LoopContext, teacher_source: str | None = None,
             teacher_cache: str | None = None) -> None:
    """Train ``stage`` on this worker's part of the data; report every epoch, checkpoint every k."""
    tcfg = stage_train(cfg, stage)
    device, rank, world = ctx.device, ctx.rank, ctx.world
    manifest = read_manifest(shard_dir)
    crop = tcfg.crop_size or manifest["image_size"]
    torch.manual_seed(_seed_for(tcfg.seed, -1, 0))  # same initial weights on every rank
    task = build_task(stage, cfg, manifest, device, teacher_source, teacher_cache)
    ocfg = task.opt_cfg
    model = task.model.to(device)
    channels_last = tcfg.channels_last == "on" or (tcfg.channels_last == "auto" and prefers_channels_last(model, device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    train = load_split(shard_dir, "train", rank, world, device)
    val = load_split(shard_dir, "val", rank, world, device)
    task.bind_train_part(train.paths, device)
    n_train = manifest["split_sizes"]["train"]
    per_worker = max(1, ocfg.batch_size // world)
    per_worker = min(per_worker, max(1, n_train // world))
    steps_per_epoch = max(1, (n_train // world) // per_worker)  # equal on every rank (DDP needs that)
    total_steps = steps_per_epoch * ocfg.epochs

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    lr = effective_lr(ocfg)
    optimizer = create_optimizer_v2(task.optimizer_target(model), opt=ocfg.optimizer, lr=lr, weight_decay=ocfg.weight_decay)
    warmup = ocfg.warmup_steps if ocfg.warmup_steps is not None else int(round(ocfg.warmup_epochs * steps_per_epoch))
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps), lr_min=ocfg.min_lr, warmup_t=warmup,
        warmup_lr_init=lr * 1e-3 if warmup else lr, t_in_epochs=False,
    )
    amp_dtype = _amp_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, global_step = 0, 0
    history: list[dict[str, float]] = []  # one row per epoch; travels inside every checkpoint
    if ctx.resume_dir:
        history = checkpoints.read_meta(ctx.resume_dir).get("history", [])
        model.load_state_dict(torch.load(os.path.join(ctx.resume_dir, checkpoints.MODEL_FILE), map_location=device, weights_only=True))
        state = checkpoints.load_train_state(ctx.resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        ctx.print_fn(f"[{stage}] resuming after epoch {state['epoch'] + 1} (step {global_step})")
    model = ctx.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    meta = {**task.meta, "stage": stage, "class_names": manifest["class_names"], "num_classes": manifest["num_classes"],
            "image_size": manifest["image_size"], "resize_mode": manifest["resize_mode"], "input_size": crop,
            "eval_transform": tcfg.eval_transform}
    last_val: dict[str, float] = {}
    pending_logs: list[tuple[dict[str, float], int]] = []
    # A resumed run that had already finished reports its final state again without training.
    rerun_last = start_epoch >= ocfg.epochs
    start_epoch = min(start_epoch, ocfg.epochs - 1)

    for epoch in range(start_epoch, ocfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator(device=device)
        gen.manual_seed(_seed_for(tcfg.seed, epoch, rank))
        torch.manual_seed(_seed_for(tcfg.seed, epoch, rank) + 1)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, correct, n, non-finite steps
        first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step here (no sync per step)
        parts: dict[str, torch.Tensor] = {}
        task.start_epoch(epoch)
        if not rerun_last:
            task.set_train_mode(model)
            order = torch.randperm(len(train), generator=gen, device=device)
            for step in range(steps_per_epoch):
                idx = order[(step * per_worker) % max(len(train), 1) :][:per_worker]
                y = train.labels[idx]
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    if task.builds_inputs:  # function matching, replayed teacher views
                        out = task.train_step_from(model, train.images, train.labels, idx, gen, channels_last)
                    else:
                        x = batch_for_training(train.images, idx, tcfg, crop, task.mean, task.std, gen, channels_last)
                        out = task.train_step(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["loss"]).backward()
                if ocfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                global_step += 1
                scheduler.step_update(num_updates=global_step)
                b = float(len(y))
                target = out.get("target", y)
                finite = torch.isfinite(out["loss"].detach())
                first_bad = torch.where(finite | (first_bad >= 0), first_bad, torch.full_like(first_bad, step))
                sums += torch.stack([out["loss"].detach().double() * b, (out["logits"].argmax(-1) == target).sum().double(),
                                     torch.tensor(b, dtype=torch.float64, device=device), (~finite).double()])
                for k, v in out.items():
                    if k.startswith("loss_"):
                        parts[k] = parts.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.double() * b
        keys = sorted(parts)
        packed = _all_reduce(torch.cat([sums, torch.stack([parts[k] for k in keys]) if keys else sums[:0]]), world).cpu()
        train_time = time.perf_counter() - t0
        n = max(packed[2].item(), 1.0)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": packed[0].item() / n, "train_acc": packed[1].item() / n,
                                   "lr": optimizer.param_groups[-1]["lr"], "images_per_s": packed[2].item() / max(train_time, 1e-9)}
        metrics.update({f"train_{k}": packed[4 + i].item() / n for i, k in enumerate(keys)})
        if packed[3].item() > 0:
            # Every rank sees the summed count, so all stop together; nothing of this epoch is logged,
            # checkpointed or published, and the driver turns the report into a clear error.
            bad_step = int(first_bad.item())
            ctx.report({"epoch": epoch + 1, "diverged": 1.0, "nonfinite_steps": packed[3].item(),
                        "first_nonfinite_step": float(bad_step + 1 if bad_step >= 0 else -1)}, None)
            return
        last_epoch = epoch + 1 == ocfg.epochs
        do_ckpt = last_epoch or (epoch + 1) % tcfg.checkpoint_every == 0
        if last_epoch or do_ckpt or (epoch + 1) % tcfg.eval_every == 0 or not last_val:
            model.eval()
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                last_val = evaluate(task, model, val, tcfg, crop, manifest["num_classes"], world)
        metrics.update({k: v for k, v in last_val.items() if not k.startswith("_")})
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if rank == 0:
            ctx.print_fn(f"[{stage}] epoch {epoch + 1}/{ocfg.epochs} loss {metrics['train_loss']:.4f} "
                         f"acc {metrics['train_acc']:.3f} val_acc {metrics.get('val_acc', float('nan')):.3f} "
                         f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.0f} img/s {metrics['epoch_time_s']:.1f}s")
        pending_logs.append(({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1))
        history = [h for h in history if h["epoch"] < epoch + 1] + [dict(metrics)]
        if do_ckpt:
            # MLflow gets an epoch's metrics only once a checkpoint covers it: a restart re-runs the
            # epochs after the last checkpoint, and their metrics must not be logged twice.
            if rank == 0 and ctx.log_metrics:
                for m, step in pending_logs:
                    ctx.log_metrics(m, step)
            pending_logs = []
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_dir = None
                if rank == 0:
                    train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "scaler": scaler.state_dict(), "epoch": epoch, "global_step": global_step,
                                   "rng_torch": torch.get_rng_state(), "rng_augment": gen.get_state().cpu()}
                    meta_now = {**meta, "epoch": epoch + 1, "val_acc": metrics.get("val_acc"), "confusion": last_val.get("_confusion"),
                                "history": history}
                    checkpoints.save(tmp, unwrap(model).state_dict(), meta_now, train_state)
                    ckpt_dir = tmp
                ctx.report(metrics, ckpt_dir)
        else:
            ctx.report(metrics, None)
        if ctx.fault and ctx.fault["epoch"] == epoch + 1 and rank == ctx.fault.get("rank", 0) and not os.path.exists(ctx.fault["marker"]):
            open(ctx.fault["marker"], "w").close()
            ctx.print_fn(f"[{stage}] fault injection: killing worker {rank} after epoch {epoch + 1}")
            # Optional pause so Ray's controller can collect the report first (a deterministic test).
            time.sleep(float(ctx.fault.get("delay_s", 0)))
            os._exit(1)


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


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from pipeline.tracking import EpochLogger

    cfg = PipelineConfig.model_validate(config["cfg"])
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads_per_worker or max(1, int(cfg.ray.cpus_per_worker)))
    logger = EpochLogger(config.get("tracking_uri"), config.get("run_id"), cfg.tracking.fail_fast, config.get("unsent_path")) if rank == 0 else None

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    checkpoint = ray.train.get_checkpoint()
    resume_ctx = checkpoint.as_directory() if checkpoint else None
    resume_dir = resume_ctx.__enter__() if resume_ctx else None
    try:
        ctx = LoopContext(rank, world, device, report, resume_dir, ray.train.torch.prepare_model,
                          logger.log if logger else None, print_fn=_console_line, fault=config.get("fault"))
        run_loop(cfg, config["stage"], config["shard_dir"], ctx, config.get("teacher_source"), config.get("teacher_cache"))
    finally:
        if resume_ctx:
            resume_ctx.__exit__(None, None, None)
        if logger:
            logger.close()
