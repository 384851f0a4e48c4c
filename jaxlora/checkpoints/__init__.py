"""jaxlora.checkpoints"""
