"""Training: one loop (loop.py) for every stage; what differs per stage lives in steps.py."""
