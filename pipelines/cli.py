"""The `pixeldensity` command: one subcommand per pipeline module.

    pixeldensity make-shards SOURCE PREFIX [options]   # pipelines.make_shards
    pixeldensity train --data ... --output-dir ...     # pipelines.train

Each subcommand is the `main(argv)` of one module under `pipelines/`, imported only when chosen,
so a subcommand's dependencies (Beam, webdataset) load only for that subcommand. A pipeline is
added by adding its name and module to `SUBCOMMANDS`; a listed module that is not present in
this installation is reported as such.
"""

from __future__ import annotations

import importlib
import sys

from pipelines.options import exit_on_user_error

# Subcommand -> module whose `main(argv)` runs it.
SUBCOMMANDS = {
    "make-shards": "pipelines.make_shards",
    "train": "pipelines.train",
    "score": "pipelines.score",
    "calibrate": "pipelines.calibrate",
    "evaluate": "pipelines.evaluate",
    "demo": "pipelines.demo",
}

_DESCRIPTIONS = {
    "make-shards": "write WebDataset shards from a folder, IDX files, an .npz or a zip",
    "train": "train a density model on shards (alone or under torchrun)",
    "score": "score shards with a checkpoint: one Parquet row per sample (Beam)",
    "calibrate": "store held-out in-distribution scores in a checkpoint, for the flags",
    "evaluate": "AUROC, AUPRC and FPR@95%TPR of every score on two sets of shards",
    "demo": "the main job on the shipped real samples, with a summary",
}

_USAGE = (
    "usage: pixeldensity SUBCOMMAND [options]   (SUBCOMMAND -h for its options)\n\n"
    + "\n".join(f"  {name:12} {_DESCRIPTIONS[name]}" for name in SUBCOMMANDS)
)


def main(argv: list[str] | None = None) -> int:
    """Runs the subcommand named by the first argument; returns the process exit status.

    Args:
        argv: the arguments after the program name; None reads `sys.argv[1:]`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    name, rest = argv[0].replace("_", "-"), argv[1:]
    if name not in SUBCOMMANDS:
        print(f"pixeldensity: unknown subcommand {name!r}\n{_USAGE}", file=sys.stderr)
        return 2

    module_name = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"pixeldensity: subcommand {name!r} is not available yet", file=sys.stderr)
        return 2
    return exit_on_user_error(module.main)(rest)


if __name__ == "__main__":
    sys.exit(main())
