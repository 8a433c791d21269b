"""``masksam`` (and ``python -m masksam_core``): one command for the engine's doors.

    masksam predict -i CT -o organs.nii.gz      # = python -m masksam_core.predict
    masksam train --data DATASET --out MODEL     # = python -m masksam_core.train
    masksam evaluate --pred P --ref R --out r.json
    masksam model {summary,init,card,atlas} ...
    masksam sample-data

Each subcommand takes exactly the options of its ``python -m masksam_core.<door>`` (``masksam predict --help``);
modules are imported only for the subcommand that runs, so ``masksam --help`` does not import torch.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "predict": ("masksam_core.predict", "segment the organs of a CT or MR volume"),
    "train": ("masksam_core.train", "train or fine-tune a model on a labelled dataset"),
    "refine": ("masksam_core.refine", "re-decode one organ of a segmentation with a box and/or points (LPS mm)"),
    "evaluate": ("masksam_core.evaluate", "Dice, HD95 and surface Dice against reference labels"),
    "model": ("masksam_core.model.__main__", "model folders: summary, init, card, atlas"),
    "sample-data": ("masksam_core.sample_data", "fetch TotalSegmentator's example CT"),
}


def usage() -> str:
    lines = ["usage: masksam COMMAND [options]   (masksam COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "train":
        from .cli_util import ask_torch_for_huge_pages

        ask_torch_for_huge_pages()  # as python -m masksam_core.train does, before torch is imported
    from .cli_util import run_cli

    sys.argv = ["masksam", name] + rest  # as typed: a training run records its command line in the model card
    # the import runs inside run_cli too: a door that fails to import is one line and a log, as a door that fails
    return run_cli(lambda argv: importlib.import_module(COMMANDS[name][0]).main(argv), rest, name=name)


if __name__ == "__main__":
    raise SystemExit(main())
