"""Train from a YAML config: ``python main.py --config configs/quickstart.yml``.

Works from a checkout without installing the package (``src/`` is put on the
path); ``pip install .`` provides the same entry point as ``okd-train``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from okd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
