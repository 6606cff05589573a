"""Errors the coordinator raises; the servicer maps each to one gRPC status.

A client's malformed request raises ValueError (INVALID_ARGUMENT), as the math does.
"""
from __future__ import annotations


class GradshardError(Exception):
    """Base of the coordinator's own errors."""


class NotFound(GradshardError):
    """An unknown job or a missing data file (NOT_FOUND)."""


class FailedPrecondition(GradshardError):
    """The request is valid but the job cannot serve it now (FAILED_PRECONDITION)."""


class Aborted(GradshardError):
    """A concurrency conflict: the job is not at the step the request expected (ABORTED)."""


class ResourceExhausted(GradshardError):
    """The cluster lacks the resources asked for (RESOURCE_EXHAUSTED)."""


class Unavailable(GradshardError):
    """Transient: the server or a shard is not ready; retrying may succeed (UNAVAILABLE)."""


class ShardUnavailable(Unavailable):
    """A shard's process died during a call (UNAVAILABLE)."""


class ShardTimeout(GradshardError):
    """A shard did not answer within the call timeout (DEADLINE_EXCEEDED)."""
