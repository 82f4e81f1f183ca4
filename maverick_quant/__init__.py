"""maverick-quant: streaming GPTQ/AWQ/RTN 4-bit compression and validation for Llama-family models."""

__version__ = "0.3.0"
