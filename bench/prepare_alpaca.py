"""Benchmark: `prepare` on 100k Alpaca rows (~200 tokens each) with the Qwen3 tokenizer.

Goal: <= 60 s on 2 CPU cores, cold cache. Run: python bench/prepare_alpaca.py [rows]
Prints one JSON line; the numbers go to docs/benchmarks.md with the machine and versions.
"""
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("model tune adapter weight layer token batch learn rate data train eval loss merge chat serve expert "
         "router quantize memory gradient step epoch sample prompt answer question reason think write read").split()


def make_rows(n: int, path: Path) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."
            f.write(json.dumps({"instruction": sent(rng.randint(12, 20)), "input": sent(rng.randint(0, 15)),
                                "output": " ".join(sent(rng.randint(8, 16)) for _ in range(rng.randint(10, 13)))}) + "\n")


def main(rows: int) -> None:
    import datasets
    import tokenizers
    import transformers

    from qtune.config.schema import DataConfig
    from qtune.data.prepare import prepare
    from qtune.modeling.assets import qwen3_tokenizer
    from qtune.stages import get

    home = Path(os.environ.get("QTUNE_HOME", Path.home() / ".cache" / "qtune"))
    tok = qwen3_tokenizer(home)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "alpaca.jsonl"
        make_rows(rows, src)
        cfg = DataConfig(path=str(src), cache_dir=str(Path(tmp) / "cache"), val_size=0.01)
        t = time.perf_counter()
        res = prepare(cfg, tok, "qwen3", None, get("sft").data)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        assert prepare(cfg, tok, "qwen3", None, get("sft").data).cache_hit
        hit = time.perf_counter() - t
    s = res.stats["train"]
    print(json.dumps({"bench": "prepare_alpaca", "rows": rows, "seconds_cold": round(cold, 1),
                      "seconds_cache_hit": round(hit, 2), "tokens": s["tokens"],
                      "tokens_per_example_p50": s["length"]["p50"], "tokens_per_s": round(s["tokens"] / cold),
                      "packing_efficiency": s.get("packing_efficiency"), "cpus": os.cpu_count(),
                      "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                      "datasets": datasets.__version__}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
