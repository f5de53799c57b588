"""The verbs: one module each, a short `run(cfg)` recipe over the library and `qtune.ui`."""
