import sys
from pathlib import Path

# Lets test modules share helpers (e.g. test_cli uses test_convert's reference-layout builder).
sys.path.insert(0, str(Path(__file__).resolve().parent))
