"""qtune's whole FSDP2 path on CPU processes (tests/fsdp_on_cpu's switch) with torch's grouped fully_shard hooks as
in torch 2.11 (old_torch.py; EMULATE_OLD=0 keeps this torch's own). Python imports this at start-up when this folder
is first on PYTHONPATH; see docs/fsdp_tied_head.md for the commands."""
import os
from pathlib import Path

exec((Path(__file__).resolve().parents[2] / "tests" / "fsdp_on_cpu" / "sitecustomize.py").read_text())
if os.environ.get("EMULATE_OLD", "1") == "1":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import old_torch

    old_torch.install()
