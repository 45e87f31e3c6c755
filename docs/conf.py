"""Sphinx configuration of the mthlib documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build`` after
``pip install -e ".[docs]"``. Nothing is mocked: the API and strategy pages are
rendered from the installed package, so they document the code that runs.

Measured results are not written by hand. The measurements are committed as data in
``docs/data/<name>/`` (the tools' own output: a run's ``metrics.csv``, ``mth analyze``
JSON, plus a ``measurement.json`` with the context they do not record: commands, machine,
timings, versions), and every build first runs ``docs/generate.py``, which renders them
into ``docs/_generated/<name>.rst`` (never committed, ignored by git):

- ``quickstart_curve.rst`` (the reward curve in ``quickstart.rst``) from
  ``data/quickstart_curve/metrics.csv`` and ``measurement.json``;
- ``measuring_results.rst`` (sparsity and rank in ``tutorials/measuring.rst``) from
  ``data/measuring_results/sparsity.json``, ``rank.json`` and ``measurement.json``.

Pages pull a fragment in with ``.. include-if-exists:: /_generated/<name>.rst``, which
inserts nothing while the fragment does not exist. The figures (PNGs written by
``mth analyze``) live in ``docs/_static/``.
"""

import sys
from pathlib import Path

from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

import mthlib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402  (docs/generate.py, beside this file)

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


def write_fragments(app: Sphinx) -> None:
    """Render ``_generated/*.rst`` from ``data/`` before any page is read (``builder-inited``)."""
    srcdir = Path(app.srcdir)
    generate.write_fragments(srcdir / "data", srcdir / "_generated")


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_directive("include-if-exists", IncludeIfExists)
    app.connect("builder-inited", write_fragments)
    return {"parallel_read_safe": True}
