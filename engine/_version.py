"""The package version: the one source. pyproject.toml reads it
(`[tool.setuptools.dynamic] version`), and so do `scanpay --version` and the
client's HELLO name."""
__version__ = "0.1.0"
