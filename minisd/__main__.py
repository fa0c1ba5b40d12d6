"""`python -m minisd ...`: generate, benchmark and train from a terminal.

Each subcommand lives in the module it belongs to; this file only dispatches to it.
"""
import sys

USAGE = """usage: python -m minisd COMMAND [options]

commands:
  generate PROMPT ...        text to image (the course model by default)
  benchmark ...              ours vs diffusers, side by side, on the same weights
  train vae|clip|unet|lora|inpaint  reproduce a checkpoint in data/
  evaluate ...               the course model judged from pixels: shape fidelity, background

`python -m minisd COMMAND --help` shows a command's options."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "benchmark":
        from .benchmark import main as run
    elif command == "train":
        from .train import main as run
    elif command == "evaluate":
        from .evaluate import main as run
    elif command == "generate":
        from .pipeline import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
