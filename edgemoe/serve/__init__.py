"""``edgemoe serve``'s HTTP front end: OpenAI's API over the runtime's
continuous-batching scheduler (runtime/scheduler.py)."""
