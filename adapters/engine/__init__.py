"""The training engine: a short iteration loop, hooks for everything else, exact checkpoints."""
