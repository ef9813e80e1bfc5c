"""qvl: describe images, animated GIFs and videos at the terminal with Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""

__version__ = "0.1.0"
