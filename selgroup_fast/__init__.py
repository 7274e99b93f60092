"""selgroup_fast: fast selective task group updates and multi-task optimization baselines."""

from . import methods, ops
from .affinity import AffinityTracker
from .grouping import (
    AffinityGrouping,
    FixedGrouping,
    Grouping,
    JointGrouping,
    RandomGrouping,
    SeparateGrouping,
    make_grouping,
)
from .selective import SelectiveGroupUpdate

__version__ = "0.1.0"

__all__ = [
    "AffinityGrouping",
    "AffinityTracker",
    "FixedGrouping",
    "Grouping",
    "JointGrouping",
    "RandomGrouping",
    "SelectiveGroupUpdate",
    "SeparateGrouping",
    "__version__",
    "make_grouping",
    "methods",
    "ops",
]
