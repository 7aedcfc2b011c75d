"""Quantization study: perplexity of each target's twin under each method, on real held-out text.

The twin holds exactly what the artifact stores, so its perplexity is the artifact's quality (the
parity gate checks artifact == twin). Fast: PyTorch only, no lowering.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from mobilellm.exporter.assets import calibration_text, heldout_text
from mobilellm.exporter.checkpoint import load_checkpoint
from mobilellm.exporter.export_model import ExportModel, ExportSettings
from mobilellm.exporter.quantize import QuantMethod, fake_quantized_twin, quantize_model
from mobilellm.exporter.tokenizer import load_tokenizer


def windows(text: str, tokenizer, bos: int, count: int, length: int) -> list[torch.Tensor]:
    ids = tokenizer.encode(text)
    step = length - 1
    return [torch.tensor([bos] + ids[i * step : (i + 1) * step]) for i in range(count)]


@torch.no_grad()
def perplexity(model: ExportModel, wins: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    for w in wins:
        model.reset_cache()
        logits = model(w[None], torch.tensor([0]))[0].double()
        lp = torch.log_softmax(logits[:-1], -1)
        nll -= lp.gather(-1, w[1:, None]).sum().item()
        n += len(w) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--targets", default="onnx,coreml,executorch")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--methods", default="rtn-sym,rtn-mse,rtn-mse-asym,gptq-mse-asym")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument(
        "--no-act", action="store_true", help="drop activation rounding from the scheme (ONNX accuracy_level 0)"
    )
    ap.add_argument("--overrides", default="", help="name=bits,... mixed precision, e.g. output.weight=8")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--embedding-bits", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ckpt = load_checkpoint(args.checkpoint)
    tok = load_tokenizer(ckpt.tokenizer_path)
    bos = ckpt.config.bos_id
    model = ExportModel.from_reference(ckpt.model, ExportSettings(max_seq_len=args.max_seq_len))
    evals = windows(heldout_text(), tok, bos, 2, args.max_seq_len - 1)
    calib = windows(calibration_text(), tok, bos, args.calib_windows, args.max_seq_len - 1)
    base = perplexity(model, evals)
    print(f"fp32 perplexity {base:.4f} on {sum(len(w) - 1 for w in evals)} predicted tokens")
    from mobilellm.exporter.targets import TargetOptions, load_target

    methods = {
        "rtn-sym": QuantMethod(scale_rule="signed_extreme", asymmetric=False, gptq=False),
        "rtn-torchao": QuantMethod(scale_rule="torchao", asymmetric=False, gptq=False),
        "rtn-mse": QuantMethod(scale_rule="mse", asymmetric=False, gptq=False),
        "rtn-mse-asym": QuantMethod(scale_rule="mse", asymmetric=True, gptq=False),
        "gptq-mse": QuantMethod(scale_rule="mse", asymmetric=False, gptq=True),
        "gptq-mse-asym": QuantMethod(scale_rule="mse", asymmetric=True, gptq=True),
        "gptq-ao": QuantMethod(scale_rule="mse", asymmetric=False, gptq=True, act_order=True),
        "gptq-ao-asym": QuantMethod(scale_rule="mse", asymmetric=True, gptq=True, act_order=True),
    }
    for target in args.targets.split(","):
        module = load_target(target)
        for mname in args.methods.split(","):
            method = methods[mname]
            opts = TargetOptions(
                bits=args.bits,
                max_seq_len=args.max_seq_len,
                method=method or QuantMethod(),
                embedding_bits=args.embedding_bits,
                layer_bits=() if args.overrides else None,
            )
            t0 = time.time()
            scheme = module.quant_scheme(opts)
            if args.overrides:
                extra = []
                for item in args.overrides.split(","):
                    pattern, bits = item.split("=")
                    like = scheme.output if pattern == "output.weight" else scheme.linear
                    wq = dataclasses.replace(
                        like, bits=int(bits), group_size=None if int(bits) == 8 else like.group_size
                    )
                    if pattern == "output.weight":
                        scheme = dataclasses.replace(scheme, output=wq)
                    else:
                        extra.append((pattern, wq))
                scheme = dataclasses.replace(scheme, overrides=tuple(extra))
            if args.no_act:
                scheme = dataclasses.replace(
                    scheme,
                    linear=dataclasses.replace(scheme.linear, act_block=None),
                    output=dataclasses.replace(scheme.output, act_block=None),
                )
            q = quantize_model(
                model, scheme, calib if method is not None and method.gptq else None, bool(method and method.act_order)
            )
            twin = fake_quantized_twin(model, q)
            ppl = perplexity(twin, evals)
            print(
                f"{target:<10} {args.bits}-bit {mname:<14} ppl {ppl:.4f}  delta {100 * (ppl / base - 1):+.2f}%  ({time.time() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
