"""schemathesis hooks (SCHEMATHESIS_HOOKS=st_hooks): a benchmark upload's body, JSONL as
application/x-ndjson, is sent as the bytes generated for its binary schema."""
import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    return value if isinstance(value, bytes) else str(value).encode()
