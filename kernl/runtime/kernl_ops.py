"""kernl's own ops, callable from programs as "kernl.<name>". Each wraps a launcher from
kernl.kernels; the compiler's rewrite passes emit them."""

from __future__ import annotations
