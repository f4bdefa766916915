#!/usr/bin/env bash
# Regenerates the gRPC stubs in fedgrpc/protos/ (also reachable as protos/) from the .proto files there, so that
# generated imports read "from fedgrpc.protos import ...". The optional argument is the output root (default: here).
# $PYTHON names the interpreter whose grpcio-tools to use (default: python3 on PATH);
# the tests pass the one they run under, so a virtual environment need not be active.
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-.}"
"${PYTHON:-python3}" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    fedgrpc/protos/tensors.proto fedgrpc/protos/leader.proto fedgrpc/protos/learner.proto
