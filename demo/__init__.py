"""The Gradio demo (``make demo`` or ``python -m demo``); not installed with the package."""
