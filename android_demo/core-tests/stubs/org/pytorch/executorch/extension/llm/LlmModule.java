package org.pytorch.executorch.extension.llm;
public class LlmModule {
  public LlmModule(String modulePath, String tokenizerPath, float temperature) {}
  public int generate(String prompt, int seqLen, LlmCallback llmCallback, boolean echo) { return 0; }
  public void resetNative() {}
  public void stop() {}
  public int load() { return 0; }
}
