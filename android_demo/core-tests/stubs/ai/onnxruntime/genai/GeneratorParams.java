package ai.onnxruntime.genai;
public final class GeneratorParams implements AutoCloseable {
  public GeneratorParams(Model model) throws GenAIException {}
  public void setSearchOption(String optionName, double value) throws GenAIException {}
  public void setSearchOption(String optionName, boolean value) throws GenAIException {}
  @Override public void close() {}
}
