"""Temporary: the claims of tests/test_weighting_properties.py that today's solvers break, each with its reason.

Keys are ``property/method/case id/dtype``; each entry becomes a strict xfail (so a fix that lands turns it into
a failure to delete here). Empty once they are fixed, then this file goes.
"""

from __future__ import annotations

# With zero in the hull and c < 1 (0 outside the ball), the primal optimum is g0 + radius·u for a unit u that the
# dual formula d = g0 + λ·g_x cannot give where its optimum has g_x = 0 (weakly stationary rows): g_x's direction is
# rounding, and the op steps along g0 (csrc/manipulation/cagrad.h). A fix solves the primal problem there.
ZERO_IN_HULL = "CAGrad's dual formula where its optimum has g_x = 0 (zero in the hull, c < 1): d = g0, not optimal"

KNOWN_FAILURES: dict[str, str] = {
    "optimal/cagrad/weak_stationary-K5-seed0/float32": ZERO_IN_HULL,
    "optimal/cagrad/weak_stationary-K5-seed0/float64": ZERO_IN_HULL,
}
