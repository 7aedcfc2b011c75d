package org.pytorch.executorch.extension.llm;
public interface LlmCallback {
  void onResult(String result);
  default void onStats(String stats) {}
  default void onError(int errorCode, String message) {}
}
