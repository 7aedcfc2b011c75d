plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
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
            // The executorch-android AAR ships these two ABIs.
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
        }
    }
}

dependencies {
    // ExecuTorch runtime + LLM runner (LlmModule) for Android: keep this version equal to the
    // `executorch` Python package the exporter pins in pyproject.toml, so the .pte's format and
    // operators match the runtime (tests/test_demo_apps.py checks this).
    implementation("org.pytorch:executorch-android:1.5.1")
}
