"""bitfit.export — the workstation side: frozen model -> bias-only training bundle.

Example:
    >>> from bitfit.export import export_bundle, POLICIES
    >>> POLICIES
    ('all-biases', 'paper-subset', 'all-biases+head', 'paper-subset+head')
"""

from .biases import POLICIES, find_biases, select_trainable
from .pipeline import export_bundle

__all__ = ["export_bundle", "find_biases", "select_trainable", "POLICIES"]
