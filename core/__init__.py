"""The ground floor: errors, the config schema and presets, the method table, run-directory paths,
data sets and evaluation. It imports nothing of the project's other packages; they all stand on it."""
