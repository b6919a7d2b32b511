r"""The `rar-hf` command: generate, sample, evaluate, convert.

    rar-hf generate --class_labels 3 "seven" none --output_path grid.png
    accelerate launch -m rar_hf sample --model org/rar-xl --output_dir samples-xl
    rar-hf evaluate --samples samples-xl/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth
    rar-hf convert --generator rar_xl.bin --tokenizer maskgit-vqgan-imagenet-f16-256.bin --output_dir rar-xl

User errors (a bad flag, a missing or corrupted file, a value the model rejects) print one line on stderr and exit
with status 1 (2 for flags argparse rejects); set RAR_HF_TRACEBACK=1 to see the traceback instead.
"""

import argparse
import contextlib
import importlib
import os
import sys

# name -> (module, one-line help). Modules are imported only for the command that runs: `rar-hf --help` stays fast.
COMMANDS = {
    "generate": ("rar_hf.commands.generate", "Generate a labelled grid (or PNGs) with a RARPipeline."),
    "sample": ("rar_hf.commands.sample", "Sample images for FID (ADM npz, resumable, under accelerate launch)."),
    "evaluate": ("rar_hf.commands.evaluate", "FID, sFID, IS, precision and recall of samples against a reference."),
    "convert": ("rar_hf.convert", "Convert official RAR checkpoints into transformers/diffusers folders."),
}


class UserError(Exception):
    """A mistake in what the user asked for (a flag, a file, a folder): reported as one line, never a traceback."""


USER_ERRORS = (UserError, ValueError, TypeError, KeyError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `prog: error: message (see prog --help)`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text or type(error).__name__


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn a user error raised inside the block into `prog: error: ...` on stderr and exit status 1."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("RAR_HF_TRACEBACK"):
            raise
        # Under `accelerate launch` every process reports: the rank says which one.
        rank = os.environ.get("RANK")
        where = f" [rank {rank}]" if rank not in (None, "0") else ""
        print(f"{prog}{where}: error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if arg in COMMANDS), None)
    parser = ArgumentParser(prog="rar-hf", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rar-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            modules[name] = module = importlib.import_module(module_name)
            sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
            module.add_arguments(sub)
        else:
            subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
    args = parser.parse_args(argv)
    run(modules[args.command], args, prog=f"rar-hf {args.command}")


def run(module, args, prog: str):
    with user_errors(prog):
        if hasattr(module, "check_args"):
            module.check_args(args)
        module.main(args)


def run_script(module, argv=None, prog: str | None = None):
    """What an examples/ script runs: the same command, parsed by a parser of its own."""
    parser = ArgumentParser(prog=prog, description=module.__doc__)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    run(module, args, parser.prog)


def convert_main(argv=None):
    """`rar-hf-convert`, kept as an alias of `rar-hf convert`."""
    from . import convert

    run_script(convert, argv, prog="rar-hf-convert")


if __name__ == "__main__":
    main()
