package ai.onnxruntime.genai;
public final class Model implements AutoCloseable {
  public Model(String modelPath) throws GenAIException {}
  @Override public void close() {}
}
