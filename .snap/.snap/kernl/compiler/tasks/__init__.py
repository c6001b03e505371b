"""One room per task, over the shared tracing (trace.py, lower.py), bucket grammar
(buckets.py), passes, tuning (tune.py), validation (validate.py) and the artifact writer:
encoder.py (one program per (batch, seq) bucket) and causal_lm/ (a decoder description and
generation buckets for the runtime's fixed decoder)."""
