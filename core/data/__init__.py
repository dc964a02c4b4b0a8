"""Data layer: synthetic generator, COCO and VOC readers, split manifests, transforms."""
