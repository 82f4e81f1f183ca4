"""compress/kernels"""
