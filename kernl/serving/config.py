"""What `kernl serve` is asked to do, as one dataclass shared by the CLI and the deployment."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

# A generation batch runs for many steps: a request reaching an idle replica waits this long
# for others to share them (generation_batcher.py).
GENERATION_WAIT_MS = 5.0
# On Ctrl-C or SIGTERM, requests in flight get this long to finish; Ray's own stop comes
# after (4-8 s): a container needs a stop timeout of drain + 10 s (docs/deployment.md).
DRAIN_S = 5.0


@dataclass
class ServeConfig:
    """artifact: the artifact folder (the same path on every Ray node).
    replicas: model copies; on CUDA each takes `gpus_per_replica` of a GPU (one by default).
    max_batch_size: most sequences one batch gathers (default: the largest bucket batch);
      a batch larger than every bucket is served by several replays. For a causal LM: most
      requests one generate call holds (at most the largest batch bucket).
    batch_wait_ms: how long a request reaching an idle replica waits for others to join its
      batch. Default (None): 0 for an encoder, whose batch forms from what queued while the
      previous one ran (gather.py); 5 for a causal LM (see generation_batcher.py).
    join: causal LM: requests arriving while a batch runs join it at its next step in a
      free row (else they wait for it to end).
    device: "cuda" or "cpu" (default: cuda when the replica sees a GPU).
    plan_by: how the batch planner prices a replay: "time" (each bucket's call measured at
      start; the default on CUDA) or "tokens" (bucket tokens + replay_cost_tokens; the
      default on the CPU, where timing every bucket through Triton's interpreter is slow).
    replay_cost_tokens: with plan_by="tokens", the fixed price of one replay in tokens
      (default: the smallest bucket's tokens).
    drain_s: how long a stopping replica waits for its requests in flight to finish (on
      Ctrl-C or SIGTERM, or when Ray Serve replaces it) before it stops regardless.
    """

    artifact: str
    replicas: int = 1
    max_batch_size: int | None = None
    batch_wait_ms: float | None = None
    join: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 0.0
    plan_by: str | None = None
    replay_cost_tokens: int | None = None
    app_name: str = "kernl"
    drain_s: float = DRAIN_S

    def artifact_path(self) -> str:
        """The artifact's absolute path as this process reads it: "~/bert.kernl" unexpanded (a
        Docker exec-form CMD, Kubernetes args) expanded here, on each replica, as load()
        expands it (a replica on another node has its own home)."""
        return os.path.abspath(os.path.expanduser(self.artifact))

    def wait_s(self, generation: bool) -> float:
        """The batch wait in seconds: the configured one, else the task's default."""
        if self.batch_wait_ms is not None:
            return self.batch_wait_ms / 1000
        return GENERATION_WAIT_MS / 1000 if generation else 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        # NaN passes `< 0` and then no deadline ever comes: every request waited forever.
        if self.batch_wait_ms is not None and not _finite_at_least_0(self.batch_wait_ms):
            raise ValueError(
                f"batch_wait_ms must be a finite number >= 0, got {self.batch_wait_ms}"
            )
        if self.gpus_per_replica is not None and not _finite_at_least_0(self.gpus_per_replica):
            raise ValueError(
                f"gpus_per_replica must be a finite number >= 0, got {self.gpus_per_replica}"
            )
        if not _finite_at_least_0(self.cpus_per_replica):
            raise ValueError(
                f"cpus_per_replica must be a finite number >= 0, got {self.cpus_per_replica}"
            )
        if not _finite_at_least_0(self.drain_s):
            raise ValueError(f"drain_s must be a finite number >= 0, got {self.drain_s}")
        if self.replay_cost_tokens is not None and self.replay_cost_tokens < 0:
            raise ValueError(f"replay_cost_tokens must be >= 0, got {self.replay_cost_tokens}")
        if self.plan_by not in (None, "time", "tokens"):
            raise ValueError(f"plan_by must be 'time' or 'tokens', got {self.plan_by!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        # not 0 ("any free port"): HAProxy refuses to bind it after Ray's start, and the
        # Python proxy would listen on a port nobody is told
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must lie in [1, 65535], got {self.port}")


def _finite_at_least_0(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def config_from_args(args: dict) -> ServeConfig:
    """A ServeConfig from a Ray Serve application builder's arguments (`serve run
    kernl.serving.deployment:build artifact=PATH replicas=2 join=false`: strings; from a
    Serve config file's `args`: YAML values), each parsed as its field's type: a boolean is
    true/false/1/0 (the string "false" is not true), an integer an integer. Raises ValueError
    naming the argument for an unknown one, a missing artifact or a value of the wrong type.
    An explicit null (YAML `max_batch_size: null`) for a field whose default is None is that
    default; for any other field it is a value of the wrong type."""
    types = {f.name: str(f.type) for f in fields(ServeConfig)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(types)}")
    if "artifact" not in args:
        raise ValueError("missing argument artifact=PATH (the artifact folder)")
    parsed = {}
    for name, value in args.items():
        kind = types[name]
        if value is None and kind.endswith(" | None"):
            continue  # the field's default: None
        parsed[name] = _parse(name, value, kind.removesuffix(" | None"))
    return ServeConfig(**parsed)


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _parse(name: str, value, kind: str):
    text = str(value).strip()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{name}={value!r}: expected true or false (or 1 or 0)")
    if kind == "int":
        if isinstance(value, (bool, float)):
            raise ValueError(f"{name}={value!r}: expected an integer")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected an integer") from None
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a number")
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a number") from None
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected a string")
    return value
