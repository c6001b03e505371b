"""`kernl serve`: an HTTP endpoint for a compiled artifact on Ray Serve (extra `serve`).

cli.py                   argparse entry point (`kernl serve`, `python -m kernl.serving`)
ingress.py               HAProxy or Ray Serve's Python proxy in front, set before Ray (no Ray)
deployment.py            the Ray Serve deployment of encoders: routes, replicas
gather.py                encoder requests gathered into batches when the model frees (no Ray)
encoder.py               one gathered batch of encoder requests served (no Ray)
batching.py              cutting a batch of sequences into the artifact's buckets (no Ray)
protocol.py              the JSON request/response format and its checks (no Ray)
generation.py            the Ray Serve deployment of causal LMs: routes, SSE streaming
generation_protocol.py   generation requests, their checks, answers and events (no Ray)
generation_batcher.py    concurrent generation requests sharing generate calls (no Ray)
metrics.py               counters behind GET /metrics
device.py                the replica's GPU and whether a failed call broke it (no Ray)
tokenizer.py             optional text input from the artifact's tokenizer.json
loadgen.py               a load generator (standard library only)

Importing this package imports neither Ray nor the compiler; deployment.py and generation.py
import Ray. The modules marked "no Ray" import neither Ray nor Starlette: the in-process
benchmark runs them on a GPU machine without Ray."""
