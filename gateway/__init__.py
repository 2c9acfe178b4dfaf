"""lmgate: a dependable streaming gateway in front of LM Studio and OpenAI-compatible servers."""

__version__ = "0.1.0"
