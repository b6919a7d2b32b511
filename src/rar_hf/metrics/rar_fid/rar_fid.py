"""`evaluate` metric: FID, sFID, Inception Score, precision and recall in the ADM evaluator's definitions.

Load it offline from its folder (the folder and the script share the name, as evaluate requires):
``evaluate.load("<site-packages>/rar_hf/metrics/rar_fid")``. The math lives in :mod:`rar_hf.metrics.fid`;
this module only collects the sample activations (batch by batch, across processes) and calls it.
"""

import datasets
import evaluate

from rar_hf.metrics.fid import compute_statistics, frechet_distance, inception_score, precision_recall

_DESCRIPTION = """
ImageNet generation metrics as computed by the ADM evaluator (openai/guided-diffusion
evaluations/evaluator.py), the protocol behind the FID / IS numbers of ADM, RAR and most ImageNet
256x256 papers: FID on pool_3 features, sFID on the first 7 channels of mixed_6/conv, Inception Score on
the bias-free logits (chunks of 5000 samples), and improved precision / recall (k=3) on pool_3 features.
Inputs are Inception activations, one row per generated sample, from
rar_hf.metrics.inception.FIDInceptionV3 (or the TF graph itself); the reference side is passed to compute.
"""

_KWARGS_DESCRIPTION = """
Args (one row per generated sample; add them with `add_batch` or pass them to `compute`):
    pool: (N, 2048) pool_3 activations of the samples.
    spatial: (N, 2023) mixed_6/conv activations (first 7 channels, 17x17, NHWC-flattened).
    logits: (N, 1008) bias-free logits of the samples.
Keyword arguments of `compute`:
    reference_pool: (M, 2048) pool_3 activations of the reference batch (precision / recall, and FID when
        `reference_statistics` is not given).
    reference_spatial: (M, 2023) mixed_6/conv activations of the reference batch; needed only without
        `reference_statistics`.
    reference_statistics: optional mapping with the ADM reference batch's stored `mu`, `sigma`, `mu_s`,
        `sigma_s` (rar_hf.metrics.fid.read_npz_statistics); used instead of statistics of the activations.
    k: neighbourhood size for precision / recall (default 3).
    split_size: samples per Inception Score chunk (default 5000).
    device: torch device for the precision / recall distances (default CPU).
Returns:
    dict with `fid`, `sfid`, `inception_score`, `precision`, `recall` (floats).
Example:
    >>> metric = evaluate.load("path/to/rar_hf/metrics/rar_fid")
    >>> metric.compute(pool=pool, spatial=spatial, logits=logits, reference_pool=ref_pool,
    ...                reference_statistics=read_npz_statistics("VIRTUAL_imagenet256_labeled.npz"))
"""

_CITATION = """
@inproceedings{dhariwal2021diffusion,
  title={Diffusion Models Beat GANs on Image Synthesis},
  author={Dhariwal, Prafulla and Nichol, Alexander},
  booktitle={NeurIPS},
  year={2021}
}
@inproceedings{kynkaanniemi2019improved,
  title={Improved Precision and Recall Metric for Assessing Generative Models},
  author={Kynk{\"a}{\"a}nniemi, Tuomas and Karras, Tero and Laine, Samuli and Lehtinen, Jaakko and Aila, Timo},
  booktitle={NeurIPS},
  year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RarFid(evaluate.Metric):
    """FID / sFID / IS / precision / recall of generated samples against a reference batch."""

    def _info(self):
        vector = datasets.Sequence(datasets.Value("float32"))
        info = evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"pool": vector, "spatial": vector, "logits": vector}),
            reference_urls=["https://github.com/openai/guided-diffusion/tree/main/evaluations"],
        )
        # evaluate's check allows the numpy format for scalar features only, but float sequences format to
        # (N, D) arrays fine; the default (Python lists) would take ~8 GB for 50,000 samples.
        info.format = "numpy"
        return info

    def _compute(
        self,
        pool,
        spatial,
        logits,
        reference_pool,
        reference_spatial=None,
        reference_statistics=None,
        k=3,
        split_size=5000,
        device=None,
    ):
        if reference_statistics is not None:
            reference_fid = reference_statistics["mu"], reference_statistics["sigma"]
            reference_sfid = reference_statistics["mu_s"], reference_statistics["sigma_s"]
        elif reference_spatial is not None:
            reference_fid = compute_statistics(reference_pool)
            reference_sfid = compute_statistics(reference_spatial)
        else:
            raise ValueError("pass reference_statistics, or reference_spatial to compute them from activations")
        precision, recall = precision_recall(reference_pool, pool, k=k, device=device)
        return {
            "fid": frechet_distance(*compute_statistics(pool), *reference_fid),
            "sfid": frechet_distance(*compute_statistics(spatial), *reference_sfid),
            "inception_score": inception_score(logits, split_size=split_size),
            "precision": precision,
            "recall": recall,
        }
