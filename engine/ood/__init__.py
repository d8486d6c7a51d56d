"""Out-of-distribution densities (DDU, a class-conditional Gaussian on the model's features) and their
evaluation on held-out classes and calibration.
"""
