package ai.onnxruntime.genai;
// Stubs of the onnxruntime-genai Java API (src/java/src/main/java/ai/onnxruntime/genai in
// microsoft/onnxruntime-genai, the classes in the onnxruntime-genai-android AAR): the signatures the
// app calls, so it type-checks on a plain JVM. Nothing runs.
public final class GenAIException extends Exception {
  GenAIException(String message) { super(message); }
}
