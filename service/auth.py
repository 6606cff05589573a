"""Transport security: TLS credentials, the bearer-token check, and the exposure rule.

The server checks `authorization: Bearer <token>` on every call except the health
service (load balancers and probes carry no token). Serving beyond loopback without
TLS is refused unless the operator says --insecure.
"""
from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries the bearer token (health checks exempt)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler
        why = "missing bearer token" if not sent else "wrong bearer token"
        return _abort_handler(handler, f"{why}: send metadata 'authorization: Bearer <token>'")


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with the server's certificate; with client_ca, clients must show a certificate it signed."""
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=root, require_client_auth=root is not None)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tls: bool, insecure: bool) -> None:
    """Refuse plaintext beyond loopback unless the operator insists."""
    if not tls and not insecure and not is_loopback(host):
        raise ValueError(f"refusing to serve plaintext on {host!r}, beyond loopback: give --tls-cert and "
                         f"--tls-key, or --insecure if something else protects the network")


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Client side: add the token to every call's metadata (works on plaintext loopback too)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _add(self, continuation, details, request):
        metadata = list(details.metadata or []) + [self._header]
        details = details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)
        return continuation(details, request)

    intercept_unary_unary = intercept_unary_stream = _add
    intercept_stream_unary = intercept_stream_stream = _add


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method, self.timeout, self.metadata = base.method, base.timeout, metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
