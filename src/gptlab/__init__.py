"""gptlab: reproduce GPT-2 from scratch, as a tool.

Importing the package is cheap: torch is imported only by the modules that need it.
"""

__version__ = "0.1.0"
