package android.view;
public class View {
  public interface OnClickListener { void onClick(View v); }
  public View(android.content.Context context) {}
  public static int generateViewId() { return 1; }
  public int getId() { return 0; }
  public void setId(int id) {}
  public void setOnClickListener(OnClickListener l) {}
  public void setPadding(int left, int top, int right, int bottom) {}
  public void setEnabled(boolean enabled) {}
  public boolean isEnabled() { return true; }
}
