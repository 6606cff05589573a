"""Starting or joining Ray for the coordinator."""
from __future__ import annotations

import logging

import ray

from service.config import Settings

log = logging.getLogger(__name__)


def start_ray(settings: Settings) -> None:
    """Start a local Ray in this process, or join the cluster at settings.ray_address.

    With no address we pass address="local" so that a Ray cluster someone else
    started on this machine is never joined by accident.
    """
    if ray.is_initialized():
        return
    if settings.ray_address:
        log.info("joining Ray at %s", settings.ray_address)
        ray.init(address=settings.ray_address, log_to_driver=False)
        return
    kwargs = {}
    if settings.ray_cpus:
        kwargs["num_cpus"] = settings.ray_cpus
    if settings.object_store_mb:
        kwargs["object_store_memory"] = settings.object_store_mb << 20
    log.info("starting a local Ray (%s)", kwargs or "defaults")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **kwargs)
