plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

// onnxruntime-genai (ONNX bundles) is not on Maven Central: Microsoft publishes its Android AAR as a
// GitHub release asset. Keep the version equal to the `onnxruntime-genai` the exporter validates ONNX
// bundles with (pyproject.toml; tests/test_demo_apps.py checks major.minor). The AAR is fetched once
// into app/libs/ (git-ignored) on the first build; put it there yourself to build offline.
val genaiVersion = "0.18.0"
val genaiAar = file("libs/onnxruntime-genai-android-$genaiVersion.aar")
if (!genaiAar.isFile) {
    val url = "https://github.com/microsoft/onnxruntime-genai/releases/download/v$genaiVersion/onnxruntime-genai-android-$genaiVersion.aar"
    logger.lifecycle("Downloading $url")
    try {
        genaiAar.parentFile.mkdirs()
        val part = File(genaiAar.path + ".part")
        uri(url).toURL().openStream().use { input -> part.outputStream().use { input.copyTo(it) } }
        part.renameTo(genaiAar)
    } catch (e: Exception) {
        throw GradleException("Could not download $url ($e): download it by hand to ${genaiAar.path}")
    }
}

android {
    namespace = "org.mobilellm.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.mobilellm.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            // The executorch-android and onnxruntime-genai-android AARs ship these two ABIs.
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug") // demo: installable release build
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        jniLibs {
            useLegacyPackaging = true // keep the ExecuTorch .so files extractable (mmap-friendly loading)
            pickFirsts += "**/libc++_shared.so" // in case more than one AAR ships the NDK's C++ runtime
        }
    }
}

dependencies {
    // ExecuTorch runtime + LLM runner (LlmModule) for Android: keep this version equal to the
    // `executorch` Python package the exporter pins in pyproject.toml, so the .pte's format and
    // operators match the runtime (tests/test_demo_apps.py checks this).
    implementation("org.pytorch:executorch-android:1.5.1")

    // ONNX bundles: onnxruntime-genai's Java API (ai.onnxruntime.genai: Model, Tokenizer, Generator,
    // GeneratorParams) from the release AAR above, and the ONNX Runtime it loads (libonnxruntime.so)
    // from Maven Central.
    implementation(files(genaiAar))
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.27.0")
}
