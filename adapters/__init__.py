"""Method adapters (supervised, Unbiased Teacher, ...) and the shared engine and models."""
