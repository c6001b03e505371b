"""Build-time half of kernl: trace, rewrite, tune, validate, write artifacts."""

from .api import CompileReport, compile
from .buckets import parse_buckets

__all__ = ["CompileReport", "compile", "parse_buckets"]
