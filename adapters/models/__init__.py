"""Detector definitions built from torchvision parts."""
