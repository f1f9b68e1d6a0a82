"""`moshi-mlx COMMAND ...` (or `python -m moshi_mlx COMMAND ...`): one door to every entry point."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "local": ("moshi_mlx.local", "talk in the terminal (microphone and speakers)"),
    "web": ("moshi_mlx.local_web", "web UI on http://localhost:8998"),
    "client": ("moshi_mlx.client", "talk to a Moshi server on another machine"),
    "run": ("moshi_mlx.run_inference", "answer a recording: in.wav -> out.wav + transcript"),
    "convert": ("moshi_mlx.convert", "PyTorch Moshi checkpoint -> MLX layout"),
    "bench": ("moshi_mlx.benchmark.run", "does this machine keep up with real time?"),
}


def usage() -> str:
    lines = ["usage: moshi-mlx COMMAND [options]   (moshi-mlx COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moshi-mlx: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"moshi-mlx {name}", *rest]
    if hasattr(module, "console_main"):  # terminal apps end with their own quick exit (terminal.exit_now)
        module.console_main()
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
