"""Examples of a model and data of one's own (docs/own-model-and-data.md). A regular package, so that `examples.*`
resolves here before any installed package of the same name (Opacus ships one).
"""
