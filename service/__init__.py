"""The coordinator side of gradshard: coordinator, gRPC servicer, client, CLI."""
import os

# Ray forks worker processes while gRPC threads run; gRPC's fork handlers only
# log warnings there and are not needed (no gRPC channel is used in a child).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# Ray reads RAY_AUTH_MODE when it is imported, so it is set here, before any module
# of ours imports ray. Ray 2.60 already turns token auth on for a local cluster; we
# say so explicitly so that the CLI, the tests and deployments agree. An operator
# may set RAY_AUTH_MODE=disabled (or provide RAY_AUTH_TOKEN) in the environment.
os.environ.setdefault("RAY_AUTH_MODE", "token")
