"""CLI subcommands: each module defines `add_parser(subparsers)` and `run(args)`; keep imports of
torch, transformers and onnxruntime inside `run` so that `--help` stays fast."""
