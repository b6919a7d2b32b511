#!/usr/bin/env python
r"""Evaluate generated ImageNet samples with the ADM protocol: FID, sFID, Inception Score, precision, recall.

The same as `rar-hf evaluate` (the code is in rar_hf/commands/evaluate.py):

    python examples/evaluate_fid.py \
        --samples samples_50k.npz \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth \
        --output_json outputs/fid.json

In Python, the steps are: read the uint8 NHWC images (streamed from the npz), run the TF-FID Inception network
(`rar_hf.metrics.inception.FIDInceptionV3.from_pretrained(weights)`) to get pool/spatial/logits activations, and
compute the metrics with the `rar_fid` evaluate module:

    metric = evaluate.load("src/rar_hf/metrics/rar_fid")
    metric.compute(pool=..., spatial=..., logits=..., reference_pool=..., reference_spatial=...)
"""

from rar_hf.arguments import command_parser, run_script
from rar_hf.commands import evaluate

if __name__ == "__main__":
    run_script(evaluate.main, command_parser(evaluate).parse_args())
