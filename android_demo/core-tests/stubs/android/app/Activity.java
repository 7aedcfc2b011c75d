package android.app;
public class Activity extends android.content.Context {
  public static final int RESULT_OK = -1;
  protected void onCreate(android.os.Bundle savedInstanceState) {}
  protected void onDestroy() {}
  public void setContentView(android.view.View view) {}
  public final void runOnUiThread(Runnable action) {}
  public void startActivityForResult(android.content.Intent intent, int requestCode) {}
  @Deprecated protected void onActivityResult(int requestCode, int resultCode, android.content.Intent data) {}
}
