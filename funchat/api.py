"""The public API's Python code, generated from protos/funchat/v1/funchat.proto.

    from funchat.api import pb, pb_grpc

The modules in funchat/v1/ are generated when the package is built or installed (setup.py) and are
never written at run time, so this works from a read-only site-packages.
"""

from __future__ import annotations

try:
    from funchat.v1 import funchat_pb2 as pb
    from funchat.v1 import funchat_pb2_grpc as pb_grpc
except ImportError as exc:
    # Only the generated code being absent is answered here; a missing dependency (grpc,
    # protobuf) keeps its own message.
    if not (exc.name or "").startswith("funchat.v1"):
        raise
    raise ImportError(
        "funchat's generated API code (funchat/v1/funchat_pb2.py) is missing: it is generated from "
        "protos/funchat/v1/funchat.proto when the package is installed. Reinstall funchat "
        "(`make setup` or `pip install -e .` in a checkout, `pip install --force-reinstall funchat` "
        "otherwise).", name=exc.name) from exc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Funchat"].full_name  # "funchat.v1.Funchat"
