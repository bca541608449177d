"""Only the optional C speedup lives here; everything else is in pyproject.toml.

``cpmproxy.imap._scan`` does the relay's one per-line scan of bulk responses with memchr. It is optional:
without a compiler the install still succeeds and ``cpmproxy.imap.framing`` uses the same scan in Python
(a regular expression, ~7x slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("cpmproxy.imap._scan", ["cpmproxy/imap/_scan.c"], optional=True)])
