"""The skinny matmuls of a KV-cached decoding step on CPU: how fast each kernel streams the weights.

    python benchmarks/linear_kernels.py                       # RAR-B's 96 decoder matmuls, 8 rows (batch 4 + CFG)
    python benchmarks/linear_kernels.py --preset rar-xl --rows 16 --dtype bfloat16

Times one pass over every qkv / output / MLP weight of the preset's decoder (the weights do not fit in cache, as in
a real step) with `F.linear`, `W @ x^T`, MKL's packed sgemm (float32 only) and oneDNN-prepacked weights (what
`PrepackedLinear` uses during `generate()`), and prints the median time and the weight bytes streamed per second.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from generate import DTYPES, PRESETS, rar_config, time_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rar-b", choices=PRESETS)
    p.add_argument("--rows", type=int, default=8, help="Rows per product (2 x batch with guidance).")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=7, help="Timed passes; the median is reported.")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = rar_config(args.preset)
    dtype, hidden, mlp = DTYPES[args.dtype], config.hidden_size, config.intermediate_size
    torch.manual_seed(0)
    shapes = [(3 * hidden, hidden), (hidden, hidden), (mlp, hidden), (hidden, mlp)] * config.num_hidden_layers
    weights = [(torch.randn(out, inp) * 0.02).to(dtype) for out, inp in shapes]
    biases = [torch.zeros(out, dtype=dtype) for out, _ in shapes]
    inputs = {size: torch.randn(args.rows, size, dtype=dtype) for size in (hidden, mlp)}
    num_bytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"{args.preset}: {len(weights)} matmuls, {num_bytes / 2**20:.0f} MiB of {args.dtype} weights, "
          f"{args.rows} rows, {torch.get_num_threads()} threads")

    def report(name, step):
        seconds = statistics.median(time_runs(step, "cpu", args.repeats, warmup=1))
        print(f"{name:24s} {seconds * 1e3:8.1f} ms   {num_bytes / seconds / 1e9:5.1f} GB/s", flush=True)

    def f_linear():
        for w, b in zip(weights, biases):
            F.linear(inputs[w.shape[1]], w, b)

    def w_x_transposed():
        for w in weights:
            torch.mm(w, inputs[w.shape[1]].t())

    report("F.linear", f_linear)
    report("W @ x^T", w_x_transposed)
    if dtype == torch.float32 and torch.backends.mkl.is_available():
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, args.rows) for w in weights]

        def mkl_packed():
            for w, pw, b in zip(weights, packed, biases):
                torch.ops.mkl._mkl_linear(inputs[w.shape[1]], pw, w, b, args.rows)

        report("MKL packed sgemm", mkl_packed)
        del packed
    from rar_hf.cpu_kernels import can_pack

    if can_pack(weights[0]):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, args.rows) for w in weights]

        def onednn_packed():
            for w, pw, b in zip(weights, packed, biases):
                torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], pw, b, "none", [], "")

        report("oneDNN prepacked", onednn_packed)
    else:
        print("oneDNN prepacked         unavailable for this dtype / build")


if __name__ == "__main__":
    main()
