package ai.onnxruntime.genai;
public final class Generator implements AutoCloseable {
  public Generator(Model model, GeneratorParams generatorParams) throws GenAIException {}
  public boolean isDone() { return true; }
  public void appendTokens(int[] inputIDs) throws GenAIException {}
  public void appendTokenSequences(Sequences sequences) throws GenAIException {}
  public void generateNextToken() throws GenAIException {}
  public int getLastTokenInSequence(long sequenceIndex) throws GenAIException { return 0; }
  @Override public void close() {}
}
