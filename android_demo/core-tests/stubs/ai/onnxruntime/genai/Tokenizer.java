package ai.onnxruntime.genai;
public class Tokenizer implements AutoCloseable {
  public Tokenizer(Model model) throws GenAIException {}
  public Sequences encode(String string) throws GenAIException { return new Sequences(); }
  public String decode(int[] sequence) throws GenAIException { return ""; }
  public int getBosTokenId() throws GenAIException { return 0; }
  public int[] getEosTokenIds() throws GenAIException { return new int[0]; }
  public void updateOptions(java.util.Map<String, String> options) throws GenAIException {}
  public TokenizerStream createStream() throws GenAIException { return new TokenizerStream(); }
  @Override public void close() {}
}
