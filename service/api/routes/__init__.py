"""The API's routers: `jobs`, `benchmarks` and `ops` (health, metrics, the job page)."""
