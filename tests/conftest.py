import os
import sys

# The project is a flat directory of modules: make them importable from the tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
