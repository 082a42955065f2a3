"""The ``tofu-triton`` command line (also ``python -m tofu_triton``): applications built on the library.

    tofu-triton demo       a timm ViT unpatched, with ToMe and with ToFu (:mod:`tofu_triton.cli.demo`)
    tofu-triton demo-sd    one Stable Diffusion UNet step, unpatched / tomesd / ToMe / ToFu
                           (:mod:`tofu_triton.cli.sd_demo`)
    tofu-triton eval       top-1/top-5 and images/s on an ImageFolder (:mod:`tofu_triton.cli.eval`)

One module per subcommand, each with ``add_arguments(parser)``,
``check_arguments(parser, args)`` and ``run(args) -> exit code``; what they
share (device, model loading, timing) is :mod:`tofu_triton.cli.common`. This
package imports the library; the library never imports it.
"""
import argparse
import sys
from typing import List, Optional

import tofu_triton

from . import demo, eval, sd_demo

# name -> (module, help)
COMMANDS = {
    "demo": (demo, "run a timm ViT unpatched, with ToMe and with ToFu; print a table"),
    "demo-sd": (sd_demo, "one Stable Diffusion UNet step (random weights) unpatched, with tomesd, ToMe and ToFu; "
                         "print a table, save a merge picture"),
    "eval": (eval, "top-1/top-5 and images/s of a timm ViT on an ImageFolder, per (mode, r)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand; returns its exit code.

    A user mistake ends in SystemExit with one line: code 2 for a value the
    parser refuses, 1 for one found wrong later (a missing file, no GPU).
    Ctrl-C prints one line and returns 130 (128 + SIGINT, what a shell
    reports for a job stopped by Ctrl-C), not a traceback of wherever the
    model happened to be.
    """
    parser = argparse.ArgumentParser(prog="tofu-triton",
                                     description="Token Fusion (ToFu/ToMe) for timm ViTs and Stable Diffusion UNets")
    parser.add_argument("--version", action="version", version=f"%(prog)s {tofu_triton.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, (module, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text)
        module.add_arguments(parsers[name])
    args = parser.parse_args(argv)
    module = COMMANDS[args.command][0]
    module.check_arguments(parsers[args.command], args)
    try:
        return module.run(args)
    except KeyboardInterrupt:
        print(f"tofu-triton {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "main"]
