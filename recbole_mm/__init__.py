"""recbole_mm: transferable multi-modal sequential recommenders as a RecBole plugin."""

__version__ = "0.1.0"

from recbole_mm import compat as _compat

_compat.apply()
