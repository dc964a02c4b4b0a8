"""lsm-bench: semi-supervised object detection benchmark (LSM, IJCAI 2023)."""

__version__ = "0.1.0"
