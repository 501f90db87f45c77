"""A proxyless gRPC client (gRPC's own xDS resolver, gRFC A27) that dials xds:///TARGET.

Usage: GRPC_XDS_BOOTSTRAP=bootstrap.json python grpc_xds_client.py TARGET
Prints the health status the server answered, e.g. SERVING; or the status code the call
failed with, e.g. ABORTED, and exits with 1.
"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target = sys.argv[1]
with grpc.insecure_channel(f"xds:///{target}") as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=20, wait_for_ready=True)
    except grpc.RpcError as e:
        print(e.code().name)
        sys.exit(1)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
