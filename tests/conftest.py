import sys
from pathlib import Path

# examples/ and benchmarks/ are importable from the tests (they live beside the package).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# tests/ itself, for the shared helpers (hf_tiny.py)
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
