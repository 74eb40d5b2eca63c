import os
import sys

# Spawned worker processes import test modules by name: keep tests/ importable.
sys.path.insert(0, os.path.dirname(__file__))
