"""`kernl serve`: an HTTP endpoint for a compiled artifact on Ray Serve (extra `serve`).

cli.py           argparse entry point (`kernl serve`, `python -m kernl.serving`)
deployment.py    the Ray Serve deployment: routes, `@serve.batch`, replicas
batching.py      cutting a batch of sequences into the artifact's buckets (no Ray)
protocol.py      the JSON request/response format and its checks (no Ray)
metrics.py       replay counters behind GET /metrics
tokenizer.py     optional text input from the artifact's tokenizer.json

Importing this package imports neither Ray nor the compiler; deployment.py imports Ray."""
