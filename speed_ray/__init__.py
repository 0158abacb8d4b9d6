"""speed-ray: SPEED (aligned small LLMs that synthesize embedding data) on Ray."""

__version__ = "0.1.0"
