"""`mobilellm-export generate BUNDLE PROMPT`: run a bundle with its runtime's own generation client.

ExecuTorch: the C++ TextLLMRunner (what Android's LlmModule and the iOS runner wrap); ONNX:
onnxruntime-genai's Generator; Core ML: MLModel + MLState on macOS. The text streams as it is
generated; prompt and decode speed follow.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import read_manifest
from .errors import UserError
from .targets import GenerationRequest, GenerationResult, TextSink, load_target


def generate_from_bundle(bundle: Path, request: GenerationRequest, on_text: TextSink) -> GenerationResult:
    if request.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {request.max_new_tokens}")
    if request.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {request.top_p}")
    manifest = read_manifest(bundle)
    return load_target(manifest["target"]).generate(bundle, manifest, request, on_text)
