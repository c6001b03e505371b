"""What `kernl serve` is asked to do, as one dataclass shared by the CLI and the deployment."""

from __future__ import annotations

from dataclasses import dataclass

# A generation batch runs for many steps: a request reaching an idle replica waits this long
# for others to share them (generation_batcher.py).
GENERATION_WAIT_MS = 5.0


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
        if self.batch_wait_ms is not None and self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.plan_by not in (None, "time", "tokens"):
            raise ValueError(f"plan_by must be 'time' or 'tokens', got {self.plan_by!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not 0 <= self.port <= 65535:  # 0: any free port
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
