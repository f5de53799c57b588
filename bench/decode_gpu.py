"""Batch-1 decoding speed on a merged 16-bit Qwen3-8B-shaped model, qtune's paths vs plain generate.

Run on a GPU machine from the repository root:  python3 bench/decode_gpu.py
Variants (each: 32-token prompt, 256 new tokens, greedy, min_new_tokens so all produce the same count):
  plain       model.generate(), dynamic cache (what a transformers user gets)
  static      cache_implementation="static" (transformers compiles the decoding step itself)
  qtune       qtune.inference.Generation (streaming, stop criteria) with chat.cache=static
  seed        the seed recipe's path: nf4 base + unmerged LoRA adapter, plain generate
Prints a table with tok/s and the ratio to `plain`; writes $OUT/decode_gpu.json.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "seed"))
sys.path.insert(0, str(HERE.parent))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
NEW = 256


def timed(fn, n=NEW):
    fn(n)  # warm-up at the same length: compilation (and a static cache's size) outside the clock
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn(n)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from randckpt import PATH, make_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    make_checkpoint()
    info = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                transformers=__import__("transformers").__version__)
    print(json.dumps(info), flush=True)
    results = {}

    def keep(name, value, note=""):
        results[name] = dict(tok_s=round(value, 1) if value else None, note=note)
        print(json.dumps({name: results[name]}), flush=True)
        (OUT / "decode_gpu.json").write_text(json.dumps(dict(info=info, results=results), indent=1))

    tok = AutoTokenizer.from_pretrained(PATH)
    model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16, device_map={"": 0})
    model.eval()
    ids = torch.randint(0, 500, (1, 32), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def gen(**kw):
        def run(n):
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        return run

    keep("plain", timed(gen()))
    from transformers import CompileConfig

    for name, kw in (("static", dict(cache_implementation="static")),
                     ("static_cudagraphs", dict(cache_implementation="static",
                                                compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead")))):
        try:
            keep(name, timed(gen(**kw)))
        except Exception as e:
            keep(name, None, repr(e)[:300])

    # qtune's own path: what chat and serve run
    from qtune.inference import Generation, Loaded, Sampling

    loaded = Loaded(model, tok, tok.chat_template, "bench")
    for cache in ("static",):
        def q(n, cache=cache):
            s = Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.0, cache=cache, min_new_tokens=n)
            for _ in Generation(loaded, "the model fine tune lora token quant expert router layer " * 3, s):
                pass
        try:
            keep(f"qtune_{cache}", timed(q))
        except Exception as e:
            keep(f"qtune_{cache}", None, repr(e)[:300])
    del model, loaded
    torch.cuda.empty_cache()

    # the seed recipe's chat: nf4 base + unmerged adapter
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(PATH, quantization_config=qc, dtype=torch.bfloat16, device_map={"": 0})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                      "gate_proj", "up_proj", "down_proj"]))
        model.eval()
        keep("seed_nf4_adapter", timed(gen(), n=32))
    except Exception as e:
        keep("seed_nf4_adapter", None, repr(e)[:300])

    base = results["plain"]["tok_s"]
    print("\n| variant | tok/s | vs plain | note |\n|---|---|---|---|")
    for k, v in results.items():
        ratio = f"{v['tok_s'] / base:.2f}" if v["tok_s"] and base else "-"
        print(f"| {k} | {v['tok_s']} | {ratio} | {v['note']} |")


if __name__ == "__main__":
    main()
