"""`python -m funchat.gateway`: the public API's gateway alone, in front of a Ray Serve gRPC proxy
that runs elsewhere in the pod (the chart's sidecar of a RayService head). Settings from the
FUNCHAT_* environment (funchat.gateway.settings; services/orchestrator/README.md lists them)."""

from __future__ import annotations

import argparse
import logging
import sys

from funchat.gateway.server import GatewayError, serve_forever
from funchat.gateway.settings import GatewaySettings, GatewaySettingsError
from funchat.gateway.tls import TlsFilesError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m funchat.gateway", description=__doc__).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve_forever(GatewaySettings.load())
    except (GatewaySettingsError, TlsFilesError, GatewayError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
