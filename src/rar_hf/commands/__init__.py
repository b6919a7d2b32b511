"""The subcommands of `rar-hf` (see `rar_hf.cli`): each module has `add_arguments(parser)` and `main(args)`."""
