"""Sphinx configuration of the mthlib documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build`` after
``pip install -e ".[docs]"``. Nothing is mocked: the API and strategy pages are
rendered from the installed package, so they document the code that runs.

Measured results (tables, figures) are not written by hand: a tool drops reStructuredText
fragments into ``docs/_generated/`` (and PNGs into ``docs/_static/``), and pages pull
them in with ``.. include-if-exists:: /_generated/<name>.rst``, which inserts nothing
while the fragment does not exist.
"""

from pathlib import Path

from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import mthlib

project = "mthlib"
author = "mthlib contributors"
copyright = "mthlib contributors"
release = mthlib.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# Google-style docstrings; types come from the annotations and are shown beside each argument.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Hooks that mthlib overrides without a docstring would otherwise show Lightning's and
# torch's docstrings, which are not about mthlib and do not build cleanly.
autodoc_inherit_docstrings = False

exclude_patterns = ["_build", "_generated"]
html_theme = "alabaster"
html_theme_options = {"description": "Sparse-subnetwork GRPO fine-tuning", "fixed_sidebar": True}
html_static_path = ["_static"] if Path(__file__).with_name("_static").is_dir() else []


class IncludeIfExists(SphinxDirective):
    """Insert a reStructuredText file like ``.. include::``, or nothing when it does not exist."""

    required_arguments = 1
    option_spec = {"encoding": directives.encoding}

    def run(self) -> list:
        relative, absolute = self.env.relfn2path(self.arguments[0], self.env.docname)
        path = Path(absolute)
        if not path.is_file():
            return []
        self.env.note_dependency(relative)
        text = path.read_text(encoding=self.options.get("encoding", "utf-8"))
        self.state_machine.insert_input(text.splitlines(), str(path))
        return []


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_directive("include-if-exists", IncludeIfExists)
    return {"parallel_read_safe": True}
