"""The public API's generated code (protos/funchat/v1/funchat.proto), built at build time.

`make setup` runs `python -m funchat.api`, which calls the venv's own grpcio-tools (stubs from a
newer grpcio-tools would not import under our protobuf) and writes `funchat/v1/funchat_pb2.py`,
`funchat_pb2.pyi` and `funchat_pb2_grpc.py` (git-ignored). Importing this module regenerates them
when they are missing or older than the .proto, so a fresh checkout works without a build step.

    from funchat.api import pb, pb_grpc
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent          # funchat/
PROTO_ROOT = PACKAGE_ROOT.parent / "protos"             # holds funchat/v1/funchat.proto
PROTO = PROTO_ROOT / "funchat" / "v1" / "funchat.proto"
OUT_ROOT = PACKAGE_ROOT.parent                          # protoc writes funchat/v1/... under it
GENERATED = PACKAGE_ROOT / "v1"


def _stale() -> bool:
    outputs = [GENERATED / "funchat_pb2.py", GENERATED / "funchat_pb2_grpc.py"]
    if not all(p.exists() for p in outputs):
        return True
    return PROTO.exists() and min(p.stat().st_mtime for p in outputs) < PROTO.stat().st_mtime


def generate(force: bool = False) -> bool:
    """Run protoc when the generated files are stale; -> whether it ran."""
    if not force and not _stale():
        return False
    if not PROTO.exists():
        raise RuntimeError(f"{PROTO} is missing and the generated API code is absent or stale")
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    GENERATED.mkdir(exist_ok=True)
    (GENERATED / "__init__.py").write_text('"""Generated from protos/funchat/v1 (git-ignored)."""\n')
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={OUT_ROOT}",
                      f"--pyi_out={OUT_ROOT}", f"--grpc_python_out={OUT_ROOT}", str(PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    importlib.invalidate_caches()
    return True


generate()
from funchat.v1 import funchat_pb2 as pb  # noqa: E402
from funchat.v1 import funchat_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Funchat"].full_name  # "funchat.v1.Funchat"

if __name__ == "__main__":
    ran = generate(force="--force" in sys.argv)
    print(f"funchat API stubs {'generated' if ran else 'up to date'} in {GENERATED}")
