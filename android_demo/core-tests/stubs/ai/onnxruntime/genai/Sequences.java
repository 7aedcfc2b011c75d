package ai.onnxruntime.genai;
public final class Sequences implements AutoCloseable {
  Sequences() {}
  public long numSequences() { return 0; }
  public int[] getSequence(long sequenceIndex) { return new int[0]; }
  @Override public void close() {}
}
