"""Moved to :mod:`kscale.adapters.export`; this name is that module itself (old imports, saved runs)."""

import sys

from kscale.adapters import export as _moved

sys.modules[__name__] = _moved
