"""The faithfulness benchmark: metrics, statistics, the ground-truth task, the model zoo and the runner."""
