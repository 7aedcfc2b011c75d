// swift-tools-version:5.9
// The app's platform-free Swift (manifest decoding and validation, sampling, stop rules, the BOS rule,
// streamed text, tokens/s) as a package, so `swift test` can check it without Xcode or a device; the
// tests also load a real bundle's tokenizer with swift-transformers' Tokenizers (AutoTokenizer), the
// library the app tokenizes with. The app itself is built from project.yml (same swift-transformers
// release).
import PackageDescription

let package = Package(
    name: "MobileLLMCore",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [.library(name: "MobileLLMCore", targets: ["MobileLLMCore"])],
    dependencies: [
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.3.3"),
    ],
    targets: [
        .target(
            name: "MobileLLMCore",
            path: "MobileLLMDemo",
            sources: ["BundleManifest.swift", "Generation.swift"]
        ),
        .testTarget(
            name: "MobileLLMCoreTests",
            dependencies: ["MobileLLMCore", .product(name: "Tokenizers", package: "swift-transformers")],
            path: "Tests/MobileLLMCoreTests"
        ),
    ]
)
