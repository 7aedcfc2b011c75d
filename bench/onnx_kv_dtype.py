"""Does an fp16 KV cache make onnxruntime's CPU decode faster? Times 30 GroupQueryAttention nodes (the
125M shapes, rotary inside, past/present sharing one static buffer as onnxruntime-genai binds them)
with a float32 cache and with a float16 one (Cast in and out, as a graph with fp16 KV would need).

    python -m bench.onnx_kv_dtype [--threads 2] [--past 160] [--max-len 512]

Prints ms per decode step for each, alternating, in this process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
QKV = (HEADS + 2 * KV_HEADS) * HEAD_DIM


def attention_chain(kv: str, max_len: int) -> bytes:
    """LAYERS GroupQueryAttention nodes in a chain; each one's output (padded back to the fused QKV
    width) is the next one's input, so none can be skipped."""
    kv_type = TensorProto.FLOAT16 if kv == "fp16" else TensorProto.FLOAT
    table = np.random.default_rng(0).random((max_len, HEAD_DIM // 2)).astype(np.float16 if kv == "fp16" else np.float32)
    inits = [helper.make_tensor(n, kv_type, table.shape, table.tobytes(), raw=True) for n in ("cos", "sin")] + [
        helper.make_tensor("pad_start", TensorProto.INT64, [1], [HEADS * HEAD_DIM]),
        helper.make_tensor("pad_end", TensorProto.INT64, [1], [QKV]),
        helper.make_tensor("pad_axis", TensorProto.INT64, [1], [2]),
    ]
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, QKV]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    outputs, nodes, x = [], [], "qkv"
    cache = [1, KV_HEADS, max_len, HEAD_DIM]
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_{kind}{i}", kv_type, cache) for kind in "kv"]
        outputs += [helper.make_tensor_value_info(f"present_{kind}{i}", kv_type, cache) for kind in "kv"]
        src = x
        if kv == "fp16":
            nodes.append(helper.make_node("Cast", [x], [f"half{i}"], to=TensorProto.FLOAT16))
            src = f"half{i}"
        attn = f"attn{i}"
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [src, "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"],
                [attn, f"present_k{i}", f"present_v{i}"],
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV_HEADS,
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        if kv == "fp16":
            nodes.append(helper.make_node("Cast", [attn], [f"float{i}"], to=TensorProto.FLOAT))
            attn = f"float{i}"
        nodes.append(helper.make_node("Slice", [x, "pad_start", "pad_end", "pad_axis"], [f"kv_part{i}"]))
        nodes.append(helper.make_node("Concat", [attn, f"kv_part{i}"], [f"x{i}"], axis=-1))
        x = f"x{i}"
    outputs.insert(0, helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, QKV]))
    graph = helper.make_graph(nodes, "attention_chain", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def ms_per_step(kv: str, threads: int, past: int, max_len: int, steps: int = 300) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(attention_chain(kv, max_len), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    binding = session.io_binding()
    for i in range(LAYERS):
        for kind in "kv":
            buffer = rng.random((1, KV_HEADS, max_len, HEAD_DIM)).astype(np.float16 if kv == "fp16" else np.float32)
            shared = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(f"past_{kind}{i}", shared)
            binding.bind_ortvalue_output(f"present_{kind}{i}", shared)
    binding.bind_cpu_input("qkv", (rng.random((1, 1, QKV)) * 0.1).astype(np.float32))
    binding.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    binding.bind_cpu_input("total", np.array(past + 1, np.int32))
    binding.bind_output(session.get_outputs()[0].name)
    for _ in range(20):
        session.run_with_iobinding(binding)
    start = time.perf_counter()
    for _ in range(steps):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--past", type=int, default=160, help="cached positions before the decoded token")
    parser.add_argument("--max-len", type=int, default=512, help="static cache length")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"fp32": [], "fp16": []}
    for _ in range(args.rounds):
        for kv in times:
            times[kv].append(ms_per_step(kv, args.threads, args.past, args.max_len))
    for kv, ms in times.items():
        print(
            f"{kv} KV: {np.median(ms):.3f} ms per decode step for {LAYERS} GroupQueryAttention ({', '.join(f'{t:.3f}' for t in ms)})"
        )
    print(f"fp16 / fp32: {np.median(times['fp16']) / np.median(times['fp32']):.2f}x")


if __name__ == "__main__":
    main()
