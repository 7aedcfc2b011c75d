package org.pytorch.executorch;
public class Module {
  public static Module load(final String modelPath) { return null; }
  public EValue[] forward(EValue... inputs) { return null; }
  public void destroy() {}
}
