"""Key extraction: hooks (hooks.py), the unit of work (worker.py) and the stage entry (run.py)."""
