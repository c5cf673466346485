"""Moved to :mod:`kscale.adapters.model`; this name is that module itself (old imports, saved runs)."""

import sys

from kscale.adapters import model as _moved

sys.modules[__name__] = _moved
