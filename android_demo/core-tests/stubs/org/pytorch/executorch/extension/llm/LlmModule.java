package org.pytorch.executorch.extension.llm;
// Signatures of org.pytorch:executorch-android's LlmModule (a Kotlin class since 1.4; these are the
// overloads the app calls, as Java sees them). Stub: nothing runs.
public class LlmModule implements java.io.Closeable {
  public LlmModule(String modulePath, String tokenizerPath, float temperature) {}
  public void load() {}
  public void generate(String prompt, int seqLen, LlmCallback llmCallback, boolean echo) {}
  public void generate(String prompt, int seqLen, LlmCallback llmCallback, boolean echo, float temperature, int numBos, int numEos) {}
  public void stop() {}
  @Override public void close() {}
  @Deprecated public void resetNative() {}
}
