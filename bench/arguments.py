"""Command-line handling the bench scripts share: comma lists checked against their choices, presets."""
import argparse
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Set


def split_list(text: str) -> List[str]:
    """The items of a comma list, stripped, empty ones dropped: ``"a, b,"`` -> ``["a", "b"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def choice_list(parser: argparse.ArgumentParser, option: str, text: str, allowed: Iterable[str]) -> List[str]:
    """The items of the comma list ``text`` given to ``option``; ``parser.error`` (one line, exit 2)
    naming the unknown ones and the choices."""
    allowed = list(allowed)
    values = split_list(text)
    bad = [v for v in values if v not in allowed]
    if bad:
        parser.error(f"{option}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return values


def given_options(argv: Optional[Sequence[str]]) -> Set[str]:
    """The long options written on the command line (``argv``, default ``sys.argv[1:]``), without values:
    presets such as ``--quick`` fill in only the options the user left out."""
    return {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}


def fill_preset(args: argparse.Namespace, argv: Optional[Sequence[str]], preset: Dict[str, object]) -> None:
    """Set each attribute of ``preset`` on ``args`` unless its option (``--name``, ``_`` written ``-``)
    was given on the command line: what ``--smoke`` or ``--quick`` mean, overridable option by option."""
    given = given_options(argv)
    for name, value in preset.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)
