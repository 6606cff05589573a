"""The coordinator side of gradshard: coordinator, gRPC servicer, client, CLI."""
import os

# Ray forks worker processes while gRPC threads run; gRPC's fork handlers only
# log warnings there and are not needed (no gRPC channel is used in a child).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

