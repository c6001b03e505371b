"""kernl's version, in a module of its own: the compiler stamps it into every manifest
without importing the `kernl` facade, whose `optimize` imports the compiler."""

__version__ = "0.1.0"
