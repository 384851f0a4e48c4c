"""jaxlora.models"""
