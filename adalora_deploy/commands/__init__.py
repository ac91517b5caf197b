"""CLI subcommands: each module defines `add_parser(subparsers)` and `run(args)`. A command's settings
flags are generated from its config dataclass (adalora_deploy/flags.py) and added when the command is
used; keep imports of torch, transformers and onnxruntime inside `run` so that `--help` stays fast."""
