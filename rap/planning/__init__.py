"""Choosing masks without a forward pass: stored-score planners and the trained RAP policy.

Its interface, what serving and the deployments use: `MaskPlanner`, the two planners behind it
(`HeuristicPolicy`, `RapPolicy`), and how the app's `policy` setting picks one.
"""

from rap.planning.choice import PolicyChoice, ServingPolicy, build_policy, choose_policy
from rap.planning.heuristic import HeuristicPolicy
from rap.planning.planners import SERVING_PLANNERS
from rap.planning.policy import DEFAULT_POLICY_DIR, RapPolicy
from rap.planning.protocol import MaskPlanner

__all__ = [
    "DEFAULT_POLICY_DIR",
    "SERVING_PLANNERS",
    "HeuristicPolicy",
    "MaskPlanner",
    "PolicyChoice",
    "RapPolicy",
    "ServingPolicy",
    "build_policy",
    "choose_policy",
]
