"""Generated gRPC and protobuf code for ``proto/kvstore/v1/kvstore.proto``; do not edit.

Regenerate with ``scripts/gen_proto.sh``; ``tests/test_proto.py`` fails when this differs from a
fresh generation.
"""
