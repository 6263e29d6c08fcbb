#!/bin/sh
# /opt/venv/bin/tritonserver in the model-services image (first on PATH): tritonserver with the image's
# Python backend and library path (services/triton/entrypoint.py --exec-tritonserver).
exec python /opt/funchat/entrypoint.py --exec-tritonserver "$@"
