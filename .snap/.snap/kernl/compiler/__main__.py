"""`python -m kernl.compiler ...` is `kernl-compile ...`."""

from kernl.compiler.cli import compile_command

compile_command(prog_name="kernl-compile")
