package ai.onnxruntime.genai;
public class TokenizerStream implements AutoCloseable {
  TokenizerStream() {}
  public String decode(int token) throws GenAIException { return ""; }
  @Override public void close() {}
}
