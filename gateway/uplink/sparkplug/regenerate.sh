#!/usr/bin/env bash
# Regenerate sparkplug_b_pb2.py from sparkplug_b.proto (a development step;
# the generated files are committed, the gateway needs only the protobuf runtime).
#   python3 -m venv /tmp/protoc && /tmp/protoc/bin/pip install grpcio-tools==1.85.1
#   PROTOC_PYTHON=/tmp/protoc/bin/python bash gateway/uplink/sparkplug/regenerate.sh
set -euo pipefail
cd "$(dirname "$0")"
"${PROTOC_PYTHON:-python3}" -m grpc_tools.protoc --proto_path=. --python_out=. sparkplug_b.proto
