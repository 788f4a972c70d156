import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repo root holds the model's code files; tests/ holds the test helpers.
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
