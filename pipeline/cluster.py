"""Connecting to Ray: a local instance by default, a cluster when ``ray.address`` is set."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig


def init_ray(cfg: RayConfig, output_dir: str | None = None) -> None:
    """Start or join Ray once per process; reuse an instance that is already up (tests, jobs).

    With ``output_dir``, refuse a multi-node cluster that could not see it (see preflight)."""
    import ray

    if not ray.is_initialized():
        _start(cfg)
    if output_dir is not None:
        from pipeline.preflight import check_shared_storage

        check_shared_storage(output_dir, cfg)


def _start(cfg: RayConfig) -> None:
    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # The dashboard (ray[default]) also serves the state API that Ray Train's controller polls.
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = os.isatty(2)
        ctx.print_on_execution_start = False
    except Exception:  # older/newer Ray without these knobs: only cosmetics are lost
        pass
