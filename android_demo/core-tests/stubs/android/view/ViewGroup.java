package android.view;
public abstract class ViewGroup extends View {
  public ViewGroup(android.content.Context context) { super(context); }
  public void addView(View child) {}
  public void addView(View child, LayoutParams params) {}
  public View getChildAt(int index) { return null; }
  public static class LayoutParams { public static final int WRAP_CONTENT = -2; public static final int MATCH_PARENT = -1; public LayoutParams(int w, int h) {} }
}
