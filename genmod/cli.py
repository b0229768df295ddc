"""The ``genmod`` command line.

    genmod demo                                    train, sample and evaluate a small model on built-in data
    genmod train FAMILY [--field value ...]        train a family (flow, tokenizer, feature-net, ...)
    genmod sample CHECKPOINT_OR_PIPELINE [...]     sample a PNG grid (and PNGs / .npz) from a model
    genmod eval CHECKPOINT_OR_PIPELINE [...]       FID / IS / KID / precision-recall of a model
    genmod eval-folder A B                         metrics between two folders of images
    genmod ays FLOW_PIPELINE --steps 10            optimise an Align-Your-Steps time grid, saved with the pipeline
    genmod eval-tokenizer TOKENIZER_DIR            PSNR / SSIM / LPIPS / codebook usage of a tokenizer
    genmod tokenize TOKENIZER_DIR                  cache a dataset's latents / indices
    genmod make-speech-digits --out DIR            generate the spoken-digits corpus with espeak-ng
    genmod make-shards SRC OUT --shard-size N      write an image / audio folder as webdataset tar shards
    genmod import KIND CHECKPOINT --out DIR        a released checkpoint (VAR, SiT, ...) as a genmod pipeline folder
    genmod export-diffusers PIPELINE_DIR OUT       self-contained folder for DiffusionPipeline(trust_remote_code)
    genmod verify RUN_DIR                          check a run's checkpoints and pipeline folder (exit 2 if broken)

Every error is one line (``genmod: error: ...``); set GENMOD_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from genmod.families import FAMILIES

COMMANDS = {
    # name: (module, function, one-line help)
    "demo": ("genmod.demo", "main", "train, sample and evaluate a small class-conditional flow model on built-in data"),
    "train": ("genmod.cli", "train_main", "train a family: flow, tokenizer, feature-net, ... (genmod train FAMILY --help)"),
    "sample": ("genmod.sampling", "main", "sample from a checkpoint or pipeline folder into a PNG grid / PNGs / .npz"),
    "eval": ("genmod.evals.cli", "main_eval", "FID / IS / KID / precision-recall of a checkpoint or pipeline"),
    "eval-folder": ("genmod.evals.cli", "main_eval_folder", "metrics between two folders of images"),
    "ays": ("genmod.flow.ays", "main", "optimise an Align-Your-Steps time grid for a flow pipeline and save it with it"),
    "eval-tokenizer": ("genmod.tokenizer.cli", "main_eval_tokenizer", "reconstruction metrics of a tokenizer"),
    "tokenize": ("genmod.tokenizers_vq.cache", "main", "encode a dataset once into cached latents / indices"),
    "make-shards": ("genmod.data.shard_writer", "main", "write an image / audio folder as webdataset tar shards"),
    "make-speech-digits": ("genmod.data.speech_digits", "main", "generate the spoken-digits corpus with espeak-ng"),
    "import": ("genmod.importers.cli", "main", "import a released checkpoint (VAR, SiT, ...) as a genmod pipeline folder"),
    "export-diffusers": ("genmod.pipelines.export", "main", "export a pipeline as a self-contained diffusers folder"),
    "verify": ("genmod.train.integrity", "main", "check a run's checkpoints (manifests) and pipeline folder"),
}

# Families trainable with ``genmod train NAME``, from the family table (genmod/families.py):
# the module that registers each family on import, and the families with a trainer of their own.
FAMILY_MODULES = {row.name: row.module for row in FAMILIES if row.module}
SPECIAL_TRAINERS = {row.name: tuple(row.trainer.split(":")) for row in FAMILIES if row.trainer}


class CLIError(ValueError):
    """A user-facing error: printed as one line, exit status 2."""


def _load(module: str, function: str):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            raise CLIError(f"this command is not available in this install ({module} is missing)") from None
        raise
    return getattr(mod, function)


def train_main(argv: list[str]) -> int | None:
    """``genmod train FAMILY [flags]``: the one trainer with a family's model, loss and sampler."""
    names = sorted(set(FAMILY_MODULES) | set(SPECIAL_TRAINERS))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: genmod train FAMILY [--field value ...]\n\nfamilies: " + ", ".join(names))
        print("\n`genmod train FAMILY --help` lists the fields and presets of that family's config;")
        print("`genmod train FAMILY --preset NAME [--field value ...]` starts from a named recipe.")
        return 0
    name, rest = argv[0], argv[1:]
    if name in SPECIAL_TRAINERS:
        return _load(*SPECIAL_TRAINERS[name])(rest)
    if name not in FAMILY_MODULES:
        raise CLIError(f"unknown family {name!r}; known: {', '.join(names)}")
    importlib.import_module(FAMILY_MODULES[name])
    from genmod.train import run_family

    run_family(name, rest)
    return 0


def _user_errors():
    errors = [ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
              CLIError]
    try:
        from genmod.train.config import ConfigError

        errors.append(ConfigError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="genmod", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help=", ".join(sorted(COMMANDS)))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        import genmod

        print("genmod", genmod.__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(sorted(COMMANDS))}")
    module, function, _ = COMMANDS[command]
    try:
        result = _load(module, function)(rest)
    except _user_errors() as err:
        if os.environ.get("GENMOD_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"genmod {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genmod {command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
