"""The ``sparselayers`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sparselayers._quiet import native_stderr_hidden


def _hidden(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated integers, like 16,16. Received: {text!r}")
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"--hidden widths must be positive. Received: {text!r}")
    return widths


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="sparselayers", description="Trainable sparse layers for Keras.")
    commands = top.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a model with one small MLP per output, beside the workarounds")
    demo.add_argument("--outputs", type=_positive, default=1024, help="number of targets (default 1024)")
    demo.add_argument("--hidden", type=_hidden, default=[16, 16], help="tower widths, comma-separated (default 16,16)")
    demo.add_argument("--epochs", type=_positive, default=15, help="training epochs (default 15)")
    demo.add_argument("--out", default="sparselayers-demo", help="folder for pictures and summary")
    demo.add_argument("--samples", type=_positive, default=4096, help="training samples (default 4096)")
    demo.add_argument("--trunk", type=_positive, default=256, help="width of the shared trunk (default 256)")
    demo.add_argument("--no-baselines", action="store_true", help="skip the masked and per-output Dense comparisons")
    demo.add_argument("--seed", type=int, default=0)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_hidden():
        import tensorflow as tf

        tf.constant(0.0) + 1.0  # starts the runtime, which logs once more
        from sparselayers import demo

    demo.run(
        outputs=args.outputs,
        hidden=args.hidden,
        epochs=args.epochs,
        out=args.out,
        samples=args.samples,
        trunk=args.trunk,
        baselines_too=not args.no_baselines,
        seed=args.seed,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
