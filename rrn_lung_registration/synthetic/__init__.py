"""Synthetic data with exact correspondences.

* ``phantom``: a breathing-lung CT phantom (inhale / exhale) with a known displacement and landmark pairs;
* ``breathing``: realistic synthetic breathing pairs made from one real CT (``synthetic_breathing_pair``).

``breathing``'s public names are also reachable here, so ``rrn_lung_registration.synthetic.<name>`` keeps
working for code written against the former flat module of that name.
"""

from rrn_lung_registration.synthetic import breathing, phantom
from rrn_lung_registration.synthetic.breathing import *  # noqa: F403
from rrn_lung_registration.synthetic.breathing import __all__ as _breathing_all

__all__ = ["breathing", "phantom", *_breathing_all]
