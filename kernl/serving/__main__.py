"""`python -m kernl.serving PATH [options]`: the same as `kernl serve`, without click."""

import sys

from .cli import serve_main

sys.exit(serve_main(sys.argv[1:], prog="python -m kernl.serving"))
