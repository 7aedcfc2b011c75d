package android.content;
public abstract class Context {
  public java.io.File getFilesDir() { return null; }
  public java.io.File getExternalFilesDir(String type) { return null; }
  public String getPackageName() { return null; }
  public ContentResolver getContentResolver() { return null; }
  public android.content.res.Resources getResources() { return null; }
}
