"""Moved to :mod:`kscale.adapters.layer`; this name is that module itself (old imports, saved runs)."""

import sys

from kscale.adapters import layer as _moved

sys.modules[__name__] = _moved
