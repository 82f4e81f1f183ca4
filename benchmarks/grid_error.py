"""Round-to-nearest weight error of the symmetric min/max grid against llama.cpp's Q4_0 scale
rule (`QuantSpec.signed_scale`) over SmolLM2's 210 linears, per group size.

    python benchmarks/grid_error.py [--bits 4] [--groups 32 128]

Prints, per group size, sum ||W_hat - W||^2 over all linears for both grids and their ratio.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()

    from safetensors.torch import load_file

    from maverick_quant.compress.grid import rtn_quantize
    from maverick_quant.recipe import QuantSpec
    from maverick_quant.sources import smollm2_hf_dir

    linears = {name: w.float() for name, w in load_file(smollm2_hf_dir() / "model.safetensors").items()
               if name.endswith("_proj.weight")}
    print(f"SmolLM2-135M, {len(linears)} linears, {args.bits}-bit symmetric, round to nearest\n")
    print("| group | min/max grid error | signed-max grid error | ratio |\n|---|---|---|---|")
    for group in args.groups:
        errors = [sum(float((rtn_quantize(w, spec).dequantize() - w).square().sum()) for w in linears.values())
                  for spec in (QuantSpec(bits=args.bits, group_size=group, sym=True),
                               QuantSpec(bits=args.bits, group_size=group, sym=True, signed_scale=True))]
        print(f"| {group} | {errors[0]:.2f} | {errors[1]:.2f} | {errors[1] / errors[0]:.4f} |")


if __name__ == "__main__":
    main()
