"""The figure gallery: every figure and table of the CURE and RWP papers, re-made through the library.

Ordered one way, each module reading only the ones before it:

* :mod:`~layerlab.gallery.settings`: the figure groups (one record each), figure settings per profile, a call's
  context;
* :mod:`~layerlab.gallery.runs`: the runs the figures read, trained once into a shared run root;
* :mod:`~layerlab.gallery.results`: their analyses, re-used while their settings match;
* :mod:`~layerlab.gallery.figures`: one figure function per group, drawing with :mod:`layerlab.plots`;
* :mod:`~layerlab.gallery.reference`: the papers' published numbers;
* :mod:`~layerlab.gallery.manifest`: :func:`make` (one group, what a notebook calls), :func:`reproduce` (every
  group, what ``layerlab reproduce`` calls), :func:`redraw` (one group from its records alone), :func:`verify`
  (every manifest against the records), the manifests and ``README.md``;
* :mod:`~layerlab.gallery.notebooks`: what the figure notebooks call (:func:`draw`, :func:`verdict`) and
  :func:`~layerlab.gallery.notebooks.execute`, which runs them for committing.
"""

from layerlab.gallery.manifest import make, redraw, reproduce, show, verify, write_readme
from layerlab.gallery.notebooks import draw, verdict
from layerlab.gallery.settings import GROUPS, SETTINGS, FigureGroup, FigureSettings, base_config, context, settings

__all__ = ["GROUPS", "SETTINGS", "FigureGroup", "FigureSettings", "base_config", "context", "draw", "make",
           "redraw", "reproduce", "settings", "show", "verdict", "verify", "write_readme"]
