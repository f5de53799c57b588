"""Where a real `qtune train` step's wall time goes (bench only): on PYTHONPATH with QTUNE_TRACE_STEPS=FIRST:LAST and
QTUNE_TRACE_OUT=FILE, the trainer's steps FIRST..LAST run under torch.profiler and CUDA's sync debug mode. FILE gets
the wall time a step against the GPU's busy time a step (the rest is the GPU waiting for the host), the GPU's idle
gaps longer than 1 ms, each with the host operators that ran during it, what the host's Python was doing while the
GPU had nothing to do (its main thread's stack, sampled every 0.5 ms whenever the default stream was idle), every
place the host waited for the GPU (a sync), with its Python stack, and the host operators by their own CPU time.

    PYTHONPATH=bench/trace:$PYTHONPATH QTUNE_TRACE_STEPS=8:11 QTUNE_TRACE_OUT=/tmp/trace.txt qtune train ...
"""
import os

if os.environ.get("QTUNE_TRACE_STEPS"):
    import collections
    import time
    import traceback
    import warnings

    first, last = (int(x) for x in os.environ["QTUNE_TRACE_STEPS"].split(":"))
    out_path = os.environ.get("QTUNE_TRACE_OUT", "trace.txt")
    syncs = collections.Counter()

    def _show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message).lower() or "sync" in str(category).lower():
            stack = "".join(line for line in traceback.format_stack()[:-2] if "/torch/" not in line
                            or "autograd" in line)
            syncs[f"{str(message)[:100]}\n{stack[-1500:]}"] += 1
        else:
            _orig(message, category, filename, lineno, file, line)

    _orig = warnings.showwarning

    idle = collections.Counter()

    def _sampler(stop):
        import sys as _sys
        import threading

        import torch

        main = threading.main_thread().ident
        stream = torch.cuda.default_stream()
        while not stop.is_set():
            if stream.query():
                frame = _sys._current_frames().get(main)
                frames = []
                while frame is not None and len(frames) < 40:
                    code = frame.f_code
                    frames.append(f"{code.co_filename.split('site-packages/')[-1].replace('/tmp/site/', '')}:"
                                  f"{frame.f_lineno} {code.co_name}")
                    frame = frame.f_back
                idle["\n      ".join(f for f in frames if "/threading.py" not in f)[:3000]] += 1
            time.sleep(0.0005)

    def _callback():
        import threading

        import torch
        from torch.profiler import ProfilerActivity, profile
        from transformers import TrainerCallback

        class Trace(TrainerCallback):
            prof = None
            t0 = 0.0

            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 == first and self.prof is None:
                    if not torch.cuda.is_available():
                        return
                    torch.cuda.synchronize()
                    self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.prof.__enter__()
                    warnings.showwarning = _show
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    self.stop = threading.Event()
                    self.thread = threading.Thread(target=_sampler, args=(self.stop,), daemon=True)
                    self.thread.start()
                    self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == last and self.prof is not None:
                    torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - self.t0
                    self.stop.set()
                    self.thread.join()
                    self.prof.__exit__(None, None, None)
                    warnings.showwarning = _orig
                    self.write(wall, last - first + 1)
                    self.prof = False

            def write(self, wall, steps):
                events = self.prof.events()
                kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                                 if e.device_type.name == "CUDA")
                busy, gaps, end = 0.0, [], None
                for s, e in kernels:
                    if end is not None and s > end + 1000:
                        gaps.append((end, s))
                    busy += max(0, e - max(s, end or s))
                    end = e if end is None else max(end, e)
                host = [e for e in events if e.device_type.name == "CPU"]
                lines = [f"steps {first}..{last}: wall {wall / steps * 1e3:.1f} ms a step, GPU busy "
                         f"{busy / steps / 1e3:.1f} ms a step, idle gaps > 1 ms: {len(gaps)} "
                         f"({sum(b - a for a, b in gaps) / steps / 1e3:.1f} ms a step)", ""]
                for a, b in gaps[:40]:
                    during = collections.Counter()
                    for e in host:
                        s, t = e.time_range.start, e.time_range.end
                        if s < b and t > a and t - s < (b - a) * 4:
                            during[e.name] += min(t, b) - max(s, a)
                    top = ", ".join(f"{n} {d / 1e3:.1f}" for n, d in during.most_common(8))
                    lines.append(f"gap {(b - a) / 1e3:.1f} ms: {top}")
                total = sum(idle.values())
                lines += ["", f"the host's stack while the GPU was idle ({total} samples, ~0.5 ms each; innermost frame "
                          "first):"]
                lines += [f"{n} samples:\n      {k}" for k, n in idle.most_common(12)]
                lines += ["", "syncs (count, message, stack):"]
                lines += [f"{n}x {k}" for k, n in syncs.most_common(20)]
                lines += ["", self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)]
                with open(out_path, "w") as f:
                    f.write("\n".join(lines))

        return Trace()

    def _patch(module):
        init = module.Trainer.__init__

        def patched(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(_callback())

        module.Trainer.__init__ = patched

    import importlib.abc
    import sys

    class _Hook(importlib.abc.MetaPathFinder):  # patch the Trainer once transformers' trainer module is imported
        done = False

        def find_spec(self, name, path, target=None):
            if name == "transformers.trainer" and not self.done:
                self.done = True
                import importlib.util

                spec = importlib.util.find_spec(name)
                loader = spec.loader
                exec_module = loader.exec_module

                def run(module):
                    exec_module(module)
                    _patch(module)

                loader.exec_module = run
                return spec
            return None

    sys.meta_path.insert(0, _Hook())
