"""jaxlora.data"""
