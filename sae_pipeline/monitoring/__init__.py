"""Drift: the policy, the Evidently reports on each signal, and the decision they lead to."""
