import sys
from pathlib import Path

# The suite times the workloads that the scripts share: benchmarks/scripts/workloads.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
