// swift-tools-version:5.9
// The app's platform-free Swift (manifest decoding and validation, SentencePiece tokenizer, sampling,
// stop rules, tokens/s) as a package, so `swift test` can check it without Xcode or a device
// (including with a Linux Swift toolchain). The app itself is built from project.yml.
import PackageDescription

let package = Package(
    name: "MobileLLMCore",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [.library(name: "MobileLLMCore", targets: ["MobileLLMCore"])],
    targets: [
        .target(
            name: "MobileLLMCore",
            path: "MobileLLMDemo",
            sources: ["BundleManifest.swift", "SentencePieceTokenizer.swift", "Generation.swift"]
        ),
        .testTarget(name: "MobileLLMCoreTests", dependencies: ["MobileLLMCore"], path: "Tests/MobileLLMCoreTests"),
    ]
)
