"""S3-compatible gateway over the depot namespace (read operations; see docs/s3.md)."""

from depot.s3.buckets import BucketMap
from depot.s3.errors import S3Error
from depot.s3.gateway import OPERATIONS, S3Gateway
from depot.s3.server import (
    DEFAULT_S3_PORT,
    GatewayServer,
    build_gateway,
    gateway_credentials,
    start_gateway,
)
from depot.s3.sigv4 import Credentials, SigV4Verifier, sign_headers

__all__ = [
    "DEFAULT_S3_PORT",
    "OPERATIONS",
    "BucketMap",
    "Credentials",
    "GatewayServer",
    "S3Error",
    "S3Gateway",
    "SigV4Verifier",
    "build_gateway",
    "gateway_credentials",
    "sign_headers",
    "start_gateway",
]
