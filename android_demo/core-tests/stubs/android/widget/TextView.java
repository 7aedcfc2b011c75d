package android.widget;
public class TextView extends android.view.View {
  public TextView(android.content.Context context) { super(context); }
  public CharSequence getText() { return null; }
  public final void setText(CharSequence text) {}
  public final void append(CharSequence text) {}
  public final void setHint(CharSequence hint) {}
  public void setTextIsSelectable(boolean selectable) {}
  public void setInputType(int type) {}
  public int getInputType() { return 0; }
  public void setMinLines(int minLines) {}
  public int getMinLines() { return 0; }
  public CharSequence getHint() { return null; }
}
