#!/usr/bin/env python
r"""Sample class-conditional images for FID evaluation (ADM protocol: 50 per class, uint8 NHWC under `arr_0`).

The same as `rar-hf sample` (the code, and the description of the outputs, is in rar_hf/commands/sample.py):

    accelerate launch --num_processes 8 examples/sample_imagenet.py --model DIR_OR_HUB_ID --output_dir samples/rar-xl
    python examples/evaluate_fid.py --samples samples/rar-xl/samples.npz --reference VIRTUAL_imagenet256_labeled.npz ...

Each process takes every P-th (class, index) of the work list, seeds one torch.Generator per image from
(--seed, class, index) and writes images/{class:04d}_{index:03d}.png; the main process then gathers samples.npz.
A re-run into the same folder resumes only if sampling_fingerprint.json matches the new settings exactly.
"""

from rar_hf.arguments import command_parser, run_script
from rar_hf.commands import sample

if __name__ == "__main__":
    run_script(sample.main, command_parser(sample).parse_args())
