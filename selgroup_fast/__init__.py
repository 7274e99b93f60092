"""selgroup_fast: fast selective task group updates and multi-task optimization baselines."""

from . import methods, ops
from .affinity import AffinityTracker
from .selective import SelectiveGroupUpdate

__version__ = "0.1.0"

__all__ = ["AffinityTracker", "SelectiveGroupUpdate", "methods", "ops", "__version__"]
