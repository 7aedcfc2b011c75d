"""Where an ExecuTorch program's time goes, from its ETDump: per operator kind, prefill and per decode token.

    python -m bench.et_profile PTE [PTE ...] [--threads 2] [--prompt-tokens 128] [--decode-tokens 64]

The pip runtime records every kernel call (`native_call_*`, the custom ops) and, inside each XNNPACK
delegate call, every XNNPACK operator ("Fully Connected (NC, QDU8, F32, QB4W) GEMM", ...). Delegated
operators are summed by kind; "delegate overhead" is a delegate call's time not spent in its operators
(entering the delegate, quantizing activations between its ops is itself an operator); "between
kernels" is the method's time outside every kernel and delegate call. Programs must take (tokens [1, S],
input_pos [1]) like ours and export_llama's.

OpenMP is set up as the CLI sets it up (mobilellm/exporter/threads.py); `OMP_NUM_THREADS=2 python -m
bench.et_profile ...` profiles the runtime at OpenMP's defaults instead (the attention kernel's threads
then each open a team of their own).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any


def profile_pte(
    pte: Path, threads: int, prompt_tokens: int, decode_tokens: int, et_threads: int | None = None
) -> dict[str, Any]:
    """Run one prefill and `decode_tokens` single-token steps with ETDump on; ms per kind per phase."""
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from mobilellm.exporter.targets.executorch import enable_xnnpack_weight_cache, load_kernels
    from mobilellm.exporter.threads import one_openmp_thread

    load_kernels()
    enable_xnnpack_weight_cache()
    torch.set_num_threads(threads)
    if et_threads is not None:  # ExecuTorch's own pool (XNNPACK and the custom ops); default: one per core
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(et_threads)
    program = Runtime.get().load_program(Path(pte), enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (1, prompt_tokens), generator=gen)
    with one_openmp_thread():  # as ExecuTorchRuntime runs the method
        method.execute([prompt, torch.tensor([0])])
        token = torch.tensor([[7]])
        for i in range(decode_tokens):
            method.execute([token, torch.tensor([prompt_tokens + i])])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
    (block,) = [b for b in inspector.event_blocks if b.name == "Execute"]
    runs = 1 + decode_tokens
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0] * runs)
    delegate, operators, total = [0.0] * runs, [0.0] * runs, [0.0] * runs
    calls: dict[str, int] = defaultdict(int)
    for event in block.events:
        if event.perf_data is None or len(event.perf_data.raw) != runs:
            continue
        raw = event.perf_data.raw
        name = re.sub(r" #\d+$", "", event.name)
        if name == "Method::execute":
            total = list(raw)
        elif name == "DELEGATE_CALL":
            delegate = [a + b for a, b in zip(delegate, raw)]
            calls["delegate calls"] += 1
        elif name == "OPERATOR_CALL":
            operators = [a + b for a, b in zip(operators, raw)]
        else:
            kind = name.removeprefix("native_call_")
            per_kind[("xnnpack " if event.is_delegated_op else "") + kind] = [
                a + b for a, b in zip(per_kind[("xnnpack " if event.is_delegated_op else "") + kind], raw)
            ]
            calls[kind] += 1
    in_delegates = [sum(v[i] for k, v in per_kind.items() if k.startswith("xnnpack ")) for i in range(runs)]
    per_kind["delegate overhead"] = [d - o for d, o in zip(delegate, in_delegates)]
    per_kind["between kernels"] = [t - d - o for t, d, o in zip(total, delegate, operators)]

    def phase(values: list[float]) -> dict[str, float]:
        return {"prefill_ms": values[0], "decode_ms_per_token": sum(values[1:]) / decode_tokens}

    return {
        "pte": str(pte),
        "threads": threads,
        "et_threads": et_threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "total": phase(total),
        "kinds": {k: phase(v) for k, v in sorted(per_kind.items(), key=lambda kv: -sum(kv[1][1:]))},
        "calls_per_token": dict(sorted(calls.items())),
    }


def table(result: dict[str, Any]) -> str:
    t = result["total"]
    lines = [
        f"{result['pte']}: torch {result['threads']} / ExecuTorch {result['et_threads'] or 'default'} threads; prefill {result['prompt_tokens']} tokens {t['prefill_ms']:.1f} ms, "
        f"decode {t['decode_ms_per_token']:.2f} ms/token ({1000 / t['decode_ms_per_token']:.1f} tok/s)",
        f"  {'kind':<52} {'decode ms/tok':>13} {'share':>6} {'prefill ms':>10}",
    ]
    for kind, v in result["kinds"].items():
        share = v["decode_ms_per_token"] / t["decode_ms_per_token"]
        if abs(share) >= 0.002:
            lines.append(f"  {kind:<52} {v['decode_ms_per_token']:>13.3f} {share:>6.1%} {v['prefill_ms']:>10.2f}")
    calls = ", ".join(f"{k} {n}" for k, n in result["calls_per_token"].items() if n > 1)
    lines.append(f"  calls per token: {calls}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pte", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--et-threads", type=int, help="size of ExecuTorch's thread pool (default: one per core)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the profiles here")
    args = ap.parse_args(argv)
    from mobilellm.exporter.threads import one_openmp_thread_outside_torch

    one_openmp_thread_outside_torch()  # as the CLI runs the runtime (unless torch is loaded already)
    results = [profile_pte(p, args.threads, args.prompt_tokens, args.decode_tokens, args.et_threads) for p in args.pte]
    for r in results:
        print(table(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
