"""`qtune chat`: a terminal REPL over a run (its merged model, or base + adapter), streaming.

Commands: /reset, /system <text>, /think on|off (Qwen3 thinking), /save [file], /help, /exit.
Ctrl-C stops the answer being written (the session goes on); Ctrl-D exits. `--prompt "..."` answers
once and exits, for scripts. Thinking (<think>…</think>) is shown dimmed, apart from the answer.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qtune.config.schema import Config

HELP = ("commands: /reset (forget the conversation), /system <text> (set the system prompt), "
        "/think on|off (Qwen3 thinking), /save <file> (write the conversation as JSON; asks before replacing a "
        "file), /help, /exit; "
        "Ctrl-C stops an answer, Ctrl-D exits")
DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"


def run(cfg: Config, prompt: str | None = None):
    from qtune import ui
    from qtune.inference.load import load

    with ui.status("loading"):
        loaded = load(cfg, use=cfg.chat.use)
        loaded.notice = ui.note
    session = Session(loaded, cfg)
    if prompt is not None:
        answer = session.ask(prompt, out=sys.stdout, color=False)
        if not answer.endswith("\n"):
            sys.stdout.write("\n")
        return answer
    ui.info(f"qtune chat: {loaded.label}. {HELP}")
    return session.repl()


class Session:
    def __init__(self, loaded, cfg: Config):
        self.loaded = loaded
        self.cfg = cfg
        self.system = cfg.chat.system_prompt
        self.think = cfg.chat.enable_thinking
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def ask(self, text: str, out=sys.stdout, color: bool = True) -> str:
        """Stream the answer to `text` into `out`; Ctrl-C stops it and keeps what was written."""
        from qtune.inference.load import Generation, render

        self.history.append({"role": "user", "content": text})
        shown = _ThinkingSplitter(out, color)
        gen = None
        try:
            gen = Generation(self.loaded, render(self.loaded, self.messages(), self.think), self.cfg.chat)
            for piece in gen:
                shown.write(piece)
        except KeyboardInterrupt:
            if gen is not None:
                gen.stop()
            out.write(f"{DIM if color else ''} [stopped]{RESET if color else ''}")
        shown.close()
        self.history.append({"role": "assistant", "content": shown.answer.strip()})
        return shown.answer

    def repl(self) -> list[dict]:
        import os
        import readline  # noqa: F401  (line editing and history for input())

        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # a pipe or a file gets no escape codes
        while True:
            try:
                line = input(f"{BOLD}>>> {RESET}" if color else ">>> ")
            except EOFError:  # Ctrl-D
                print()
                return self.history
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, like Python's REPL
                print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    return self.history
                continue
            self.ask(line, color=color)
            print()

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/reset":
            self.history.clear()
            print("(conversation cleared)")
        elif name == "/system":
            self.system = arg or None
            print(f"(system prompt {'set' if arg else 'removed'})")
        elif name == "/think":
            if arg not in ("on", "off"):
                print("usage: /think on|off")
            else:
                self.think = arg == "on"
                print(f"(thinking {arg})")
        elif name == "/save":
            self.save(arg)
        elif name == "/help":
            print(HELP)
        else:
            print(f"unknown command {name}; {HELP}")
        return None

    def save(self, arg: str) -> Path | None:
        """/save [file]: the conversation as JSON. Missing folders are made; an existing file is replaced only after a
        yes at a y/N prompt (the name is the user's: a file written under another name would be one to hunt for); a
        folder gets a new chat-<time>.json inside. Whatever goes wrong is one line and the session goes on, the
        conversation kept, and nothing is half-written (atomic)."""
        from qtune import ui
        from qtune.io import atomic_write_bytes

        default = f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path = Path(arg or default).expanduser()
        if arg.endswith("/") or path.is_dir():
            path = path / default
        path = path.resolve() if path.is_symlink() else path  # (a link: the file it names is written)
        if path.exists():
            if not path.is_file():
                ui.print_error(f"/save {path}: not saved (not a regular file); the conversation is kept "
                               "(/save <another file>)")
                return None
            try:
                answer = input(f"{path} exists; replace it? [y/N] ")
            except (EOFError, KeyboardInterrupt):
                answer = ""
                print()
            if answer.strip().lower() not in ("y", "yes"):
                print(f"(not saved; {path} is unchanged)")
                return None
        above = path.parent
        while not above.exists() and above != above.parent:
            above = above.parent
        try:
            if not above.is_dir():
                raise NotADirectoryError(0, f"{above} is a file, so no folder can be made under it")
            saved = {"system": self.system, "messages": self.history}
            try:
                data = json.dumps(saved, indent=1, ensure_ascii=False).encode()
            except UnicodeEncodeError:  # bytes the terminal could not decode: kept as JSON escapes
                data = json.dumps(saved, indent=1).encode()
            atomic_write_bytes(path, data)  # (makes the missing folders)
        except Exception as e:  # any failure: the session and its conversation go on
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            where = getattr(e, "filename", None)
            why += f": {where}" if where and str(where) != str(path) else ""
            ui.print_error(f"/save {path}: not saved ({why}); the conversation is kept (/save <another file>)")
            return None
        print(f"(saved {len(self.history)} messages to {path})")
        return path


class _ThinkingSplitter:
    """Writes streamed text, dimming what stands between <think> and </think>; keeps the answer apart."""

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.buf = ""
        self.thinking = False
        self.answer = ""

    def write(self, piece: str) -> None:
        self.buf += piece
        while True:
            tag = "</think>" if self.thinking else "<think>"
            i = self.buf.find(tag)
            if i < 0:
                # keep a possible partial tag for the next piece
                keep = max((k for k in range(1, len(tag)) if self.buf.endswith(tag[:k])), default=0)
                self._emit(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return
            self._emit(self.buf[:i])
            self.buf = self.buf[i + len(tag):]
            self.thinking = not self.thinking
            if self.color:
                self.out.write(DIM if self.thinking else RESET + "\n")
            elif not self.thinking:
                self.out.write("\n")

    def _emit(self, text: str) -> None:
        if not text:
            return
        if not self.thinking:
            self.answer += text
        self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        self._emit(self.buf)
        self.buf = ""
        if self.color and self.thinking:
            self.out.write(RESET)
        self.out.flush()
