"""Makes `lip_fixture` (the tiny-LIP builder beside this file) importable:
pytest runs in importlib mode, which adds no test folder to sys.path."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
