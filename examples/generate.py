#!/usr/bin/env python
r"""Generate a labelled grid of class-conditional samples with a RAR pipeline: one row per class.

The same as `rar-hf generate` (the code is in rar_hf/commands/generate.py):

    # the shipped tiny-digits pipeline, every digit
    python examples/generate.py
    # a converted official model, two ImageNet classes
    python examples/generate.py --model org/rar-xl --class_labels 207 "tabby cat" --num_images_per_label 4 --device cuda

In Python:

    pipe = RARPipeline.from_pretrained(model)
    images = pipe(["seven", 3, None], num_images_per_label=8, generator=torch.Generator().manual_seed(0)).images
"""

from rar_hf.arguments import command_parser, run_script
from rar_hf.commands import generate

if __name__ == "__main__":
    run_script(generate.main, command_parser(generate).parse_args())
