"""Connecting to Ray: a local instance by default, a cluster when ``ray.address`` is set."""

from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig


_STARTED_HERE = False  # did this process start its own Ray (which cannot grow), or join a cluster?
JOINED_CLUSTER_WAIT_S = 600.0


def capacity_wait_s(cfg: RayConfig) -> float:
    """``ray.capacity_wait_s``, or its default: no wait on a private Ray, 10 min on a joined cluster."""
    if cfg.capacity_wait_s is not None:
        return cfg.capacity_wait_s
    return 0.0 if _STARTED_HERE else JOINED_CLUSTER_WAIT_S


def init_ray(cfg: RayConfig, output_dir: str | None = None) -> None:
    """Start or join Ray once per process; reuse an instance that is already up (tests, jobs).

    With ``output_dir``, refuse a multi-node cluster that could not see it (see preflight)."""
    import ray

    if not ray.is_initialized():
        _start(cfg)
        protect_auth_token()
    if output_dir is not None:
        from pipeline.preflight import check_shared_storage

        check_shared_storage(output_dir, cfg)


def _start(cfg: RayConfig) -> None:
    import ray

    global _STARTED_HERE

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    _STARTED_HERE = not address
    # The dashboard (ray[default]) also serves the state API that Ray Train's controller polls.
    from pipeline.console import quiet_library_chatter, verbose

    quiet_library_chatter()
    # Workers' and actors' own output (per-rank epoch lines, Ray's actor warnings such as the
    # PreemptionWatcher one, which no user can act on) stays in Ray's session logs; the driver shows
    # progress itself. Errors still arrive: a failed worker's exception is raised by fit().
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose())
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = os.isatty(2)
        ctx.print_on_execution_start = False
    except Exception:  # older/newer Ray without these knobs: only cosmetics are lost
        pass


def protect_auth_token(path: str = "~/.ray/auth_token") -> bool:
    """Make Ray's token file readable by its owner only (Ray writes it with the umask, often 0644:
    any local user could then submit jobs). Returns whether the mode was changed."""
    import stat

    path = os.path.expanduser(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            return True
    except OSError:  # no token (auth off, or a remote cluster's token elsewhere): nothing to protect
        pass
    return False
