#!/usr/bin/env bash
# Regenerates the gRPC stubs in protos/ from the .proto files. Run from the
# repository root so that generated imports read "from protos import ...".
# $PYTHON names the interpreter whose grpcio-tools to use (default: python3 on PATH);
# the tests pass the one they run under, so a virtual environment need not be active.
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-.}"
"${PYTHON:-python3}" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    protos/tensors.proto protos/leader.proto protos/learner.proto
