"""The SAE engine: the network, its training loops, the scikit-learn estimator, evaluation."""
