r"""The `rar-hf` command: generate, sample, evaluate, convert.

    rar-hf generate --class_labels 3 "seven" none --output_path grid.png
    accelerate launch -m rar_hf sample --model org/rar-xl --output_dir samples-xl
    rar-hf evaluate --samples samples-xl/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth
    rar-hf convert --generator rar_xl.bin --tokenizer maskgit-vqgan-imagenet-f16-256.bin --output_dir rar-xl

Exit status, the same for every command (and the examples/ scripts): 0 when done; 2 when the input was refused (a bad
flag, a missing, unwritable or corrupted file or folder, a value the model rejects), with one line
`rar-hf COMMAND: error: ...` on stderr, checked before any compute where it can be; 1 for anything else (a bug: the
traceback is shown). Set RAR_HF_TRACEBACK=1 to see the traceback of a refused input too.
"""

import importlib
import sys

from .arguments import ArgumentParser, command_parser, run_script

# name -> (module, one-line help). Modules are imported only for the command that runs: `rar-hf --help` stays fast.
COMMANDS = {
    "generate": ("rar_hf.commands.generate", "Generate a labelled grid (or PNGs) with a RARPipeline."),
    "sample": ("rar_hf.commands.sample", "Sample images for FID (ADM npz, resumable, under accelerate launch)."),
    "evaluate": ("rar_hf.commands.evaluate", "FID, sFID, IS, precision and recall of samples against a reference."),
    "convert": ("rar_hf.convert", "Convert official RAR checkpoints into transformers/diffusers folders."),
}


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
            module.add_arguments(subparsers.add_parser(name, help=help_text, description=module.__doc__))
        else:
            subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
    args = parser.parse_args(argv)
    # Nothing is returned: the console script passes main()'s result to sys.exit.
    run_script(modules[args.command].main, args, prog=f"rar-hf {args.command}")


def convert_main(argv=None):
    """`rar-hf-convert`, kept as an alias of `rar-hf convert`."""
    convert = importlib.import_module("rar_hf.convert")
    run_script(convert.main, command_parser(convert, prog="rar-hf-convert").parse_args(argv), "rar-hf-convert")


if __name__ == "__main__":
    main()
