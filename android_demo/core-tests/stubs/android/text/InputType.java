package android.text;
public interface InputType { int TYPE_CLASS_NUMBER = 2; int TYPE_NUMBER_FLAG_DECIMAL = 8192; }
