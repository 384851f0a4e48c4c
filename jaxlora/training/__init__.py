"""jaxlora.training"""
