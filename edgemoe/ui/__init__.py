"""The Textual chat app and its plain REPL fallback (``edgemoe chat`` only)."""
