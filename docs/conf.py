"""Sphinx configuration.  Build: ``python -m sphinx -W -b html docs docs/_build/html``."""
import os
import sys

from docutils import nodes
from docutils.parsers.rst import Directive

sys.path.insert(0, os.path.abspath(".."))

project = "nimplicit"
author = "the nimplicit developers"
release = "0.2.0.dev0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "numpydoc"]
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_member_order = "bysource"
autodoc_mock_imports = ["torch", "jax", "jaxopt"]
exclude_patterns = ["_build"]
html_theme = "alabaster"


class CliHelp(Directive):
    """``.. cli-help:: export``: the ``--help`` text of a subcommand, generated
    from the argparse parser itself (``""`` or no argument: the main command)."""

    optional_arguments = 1

    def run(self):
        os.environ["COLUMNS"] = "100"          # stable line wrapping
        from verification.cli import parsers
        name = self.arguments[0] if self.arguments else ""
        text = parsers()["" if name == "main" else name].format_help()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    app.add_directive("cli-help", CliHelp)
