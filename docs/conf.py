"""Sphinx configuration: ``python -m sphinx -W -b html docs docs/_build/html``."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "nimplicit"
author = "the nimplicit developers"
release = "0.2.0.dev0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "numpydoc"]
try:                      # the CLI page from argparse itself when sphinx-argparse is there
    import sphinxarg.ext  # noqa: F401
    extensions.append("sphinxarg.ext")
    tags.add("sphinxarg")  # noqa: F821  (defined by Sphinx while reading conf.py)
except ImportError:
    pass
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_member_order = "bysource"
autodoc_mock_imports = ["torch", "jax", "jaxopt", "dask", "distributed"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
suppress_warnings = ["ref.citation"]
nitpicky = False
