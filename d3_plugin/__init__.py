"""d3-plugin: D3 (Distance-Driven Detoxification) backdoor defense for BackdoorBench, and friends."""
from .d3 import D3Config, detoxify

__version__ = "0.1.0"
__all__ = ["D3Config", "detoxify", "__version__"]
