"""Connecting to Ray: a local instance by default, a cluster when ``ray.address`` is set."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process; reuse an instance that is already up (tests, jobs)."""
    import ray

    if ray.is_initialized():
        return
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
