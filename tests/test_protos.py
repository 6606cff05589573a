"""The committed stubs are what `make protos` generates from the committed .proto."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["gradshard_pb2.py", "gradshard_pb2.pyi", "gradshard_pb2_grpc.py"]


def test_generated_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(ROOT / "protos/gradshard/v1/gradshard.proto")], check=True)
    for name in GENERATED:
        fresh = (tmp_path / "gradshard/v1" / name).read_text()
        committed = (ROOT / "protos/gradshard/v1" / name).read_text()
        assert fresh == committed, f"protos/gradshard/v1/{name} is stale: run `make protos`"
