package android.widget;
public class RadioGroup extends LinearLayout {
  public RadioGroup(android.content.Context context) { super(context); }
  public void check(int id) {}
  public int getCheckedRadioButtonId() { return 0; }
}
