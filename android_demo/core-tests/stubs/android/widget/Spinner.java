package android.widget;
public class Spinner extends android.view.ViewGroup {
  public Spinner(android.content.Context context) { super(context); }
  public void setAdapter(SpinnerAdapter adapter) {}
  public SpinnerAdapter getAdapter() { return null; }
  public int getSelectedItemPosition() { return 0; }
}
